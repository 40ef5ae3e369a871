//! `expanse expand --out FILE.gguf`: a GGUF's expansion written as one GGUF that llama.cpp loads.
//! Every tensor keeps its stored type and bytes (quantized blocks, attn_q/attn_k rows in llama.cpp's
//! order): copies repeat their source layer's bytes, a zero-scaled projection is written as zero
//! blocks of its type, and the metadata is the source's, record by record as stored, with the new
//! block count.

use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::DType;

use crate::engine::{Source, Weights};
use crate::error::{Error, Result};
use crate::expand::{layer_tensor_name, scale_for, Plan, LAYER_TENSORS};
use crate::loader::all_finite;
use crate::quant::gguf::{gguf_name, hf_name, type_name, GgufFile, StoredTensor, StoredType};
use crate::quant::gguf_write::{encode_kv, GgufWriter, TensorEntry};
use crate::staging::{set_default_mode, OutKind, Staging, Target};

use super::expand::{check_space, peak_rss_bytes, transform, ExportOptions, ExportReport, ShardReport};

/// One tensor of the output: the source tensor it repeats (an index into the source's stored
/// tensors), its name in the output and the scale the plan gives it.
struct Planned {
    name: String,
    source: usize,
    scale: f64,
}

/// Writes the expansion of the GGUF `opts.model` to `opts.out` (a file), through a staging file
/// renamed into place.
pub fn export_gguf(opts: &ExportOptions) -> Result<ExportReport> {
    let started = Instant::now();
    if opts.dtype != "auto" {
        return Err(Error::flag("--dtype", "a GGUF is written in its source's own types (its blocks are copied as stored); leave --dtype out"));
    }
    Target::check(&opts.out, "--out", OutKind::File, opts.force, &[])?;
    // The model itself is refused after the open, naming it (asking for --force would mislead).
    let is_model = Path::new(&opts.model).canonicalize().ok().zip(opts.out.canonicalize().ok()).is_some_and(|(m, o)| m == o);
    if !is_model {
        refuse_existing(opts)?;
    }
    let source = Source::open(&opts.model, opts.revision.as_deref())?;
    let Weights::Gguf(g) = &source.weights else {
        let msg = format!(
            "{}: writing a GGUF needs a GGUF --model (its blocks are copied as stored); write this checkpoint to a folder, or convert it with llama.cpp's convert_hf_to_gguf.py and expand the GGUF",
            opts.out.display()
        );
        return Err(Error::flag("--out", msg));
    };
    let plan = Plan::from_spec(&opts.expand, source.config.num_hidden_layers, &opts.model)?;
    let target = Target::check(&opts.out, "--out", OutKind::File, opts.force, &source.input_paths(&opts.expand))?;
    // Again after the (maybe long) open: a file that appeared meanwhile is not replaced unasked.
    refuse_existing(opts)?;
    let stored = g.stored_tensors()?;
    let planned = plan_tensors(g, &stored, &plan)?;
    let metadata = output_metadata(g, plan.layers.len(), plan.source_layers)?;
    let entries: Vec<TensorEntry> =
        planned.iter().map(|p| TensorEntry { name: p.name.clone(), dims: stored[p.source].dims.clone(), ty: stored[p.source].ty }).collect();
    let tensor_bytes: u64 = planned.iter().map(|p| stored[p.source].bytes.len() as u64).sum();
    let metadata_bytes: u64 = metadata.iter().map(|r| r.len() as u64).sum();
    check_space(target.parent(), tensor_bytes + metadata_bytes, &[], planned.len())?;

    let staging = Staging::create(&target)?;
    let path = staging.out();
    let written = write_file(g, &stored, &planned, &entries, &metadata, &plan, &path, opts.progress);
    written.map_err(|e| staging.user_error(e))?;
    staging.commit()?;

    let file = target.name().to_string();
    Ok(ExportReport {
        out: opts.out.clone(),
        model: opts.model.clone(),
        expand: plan.spec.clone(),
        source_layers: plan.source_layers,
        layers: plan.layers.len(),
        inserted: plan.inserted(),
        dtype: type_summary(&entries),
        tensors: planned.len(),
        tensor_bytes,
        shards: vec![ShardReport { file: file.clone(), tensors: planned.len(), tensor_bytes }],
        files: vec![file],
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        warnings: plan.warnings.clone(),
    })
}

/// A GGUF is gigabytes of someone's work: an existing `--out` is replaced only when asked (`--force`),
/// as a non-empty folder is.
fn refuse_existing(opts: &ExportOptions) -> Result<()> {
    if !opts.force && std::fs::symlink_metadata(&opts.out).is_ok() {
        return Err(Error::flag("--out", format!("{} exists; pass --force to replace it", opts.out.display())));
    }
    Ok(())
}

/// The output's tensors in the source's order: tensors outside the layers where the source has
/// them, and in the place of the source's layers every output layer's tensors, each a copy of its
/// source layer's (`blk.S.x` → `blk.I.x`), in the source layer's order.
fn plan_tensors(g: &GgufFile, stored: &[StoredTensor<'_>], plan: &Plan) -> Result<Vec<Planned>> {
    // Every layer a copy is made of must be whole: a missing tensor would make a file llama.cpp refuses.
    for layer in &plan.layers {
        if let Some(name) = LAYER_TENSORS.iter().map(|suffix| layer_tensor_name(layer.source, suffix)).find(|n| !g.has(n)) {
            return Err(Error::MissingTensor { path: g.path().to_path_buf(), name: gguf_name(&name).unwrap_or(name) });
        }
    }
    let mut out = Vec::new();
    let mut layers_done = false;
    for (k, t) in stored.iter().enumerate() {
        if layer_of(t.name).is_none() {
            out.push(Planned { name: t.name.to_string(), source: k, scale: global_scale(g, plan, t.name)? });
            continue;
        }
        if std::mem::replace(&mut layers_done, true) {
            continue;
        }
        for (i, layer) in plan.layers.iter().enumerate() {
            for (s, u) in stored.iter().enumerate() {
                let Some((l, rest)) = layer_of(u.name).filter(|(l, _)| *l == layer.source) else { continue };
                let hf = hf_name(u.name).ok_or_else(|| Error::bad_file(g.path(), format!("tensor `{}` has no place in a Llama/Mistral model", u.name)))?;
                let suffix = hf.strip_prefix(&format!("model.layers.{l}.")).unwrap_or(&hf);
                out.push(Planned { name: format!("blk.{i}.{rest}"), source: s, scale: plan.layer_scale(i, suffix) });
            }
        }
    }
    // Before anything is written: a quantized tensor can only be copied or zeroed.
    if let Some(p) = out.iter().find(|p| dense_type(stored[p.source].ty).is_none() && p.scale != 0.0 && p.scale != 1.0) {
        let t = &stored[p.source];
        let msg =
            format!("tensor `{}` is {:?} blocks, which the plan scales by {}: a GGUF's quantized tensors can only be copied or zeroed", t.name, t.ty, p.scale);
        return Err(Error::bad_file(g.path(), msg));
    }
    Ok(out)
}

/// The float dtype of a stored type, None for a block type.
fn dense_type(t: GgmlDType) -> Option<DType> {
    match StoredType::of(t) {
        Some(StoredType::Dense(d)) => Some(d),
        _ => None,
    }
}

/// `blk.N.rest` as (N, rest).
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let (l, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

/// The plan's scale for a tensor outside the layers (the embedding, the final norm, the head).
fn global_scale(g: &GgufFile, plan: &Plan, name: &str) -> Result<f64> {
    if name == crate::quant::gguf::ROPE_FREQS {
        return Ok(1.0); // part of the config, copied as it is (mergekit's `scale` filters name weights)
    }
    let hf = hf_name(name).ok_or_else(|| Error::bad_file(g.path(), format!("tensor `{name}` has no place in a Llama/Mistral model")))?;
    let rules = if hf == "model.embed_tokens.weight" { &plan.embed_scale } else { &plan.head_scale };
    Ok(scale_for(rules, &hf))
}

/// The source's metadata records as stored, in its order, with `{arch}.block_count` set to `layers`
/// (llama.cpp looks keys up by name). Metadata with a value per layer cannot follow the expansion:
/// refused by key.
fn output_metadata(g: &GgufFile, layers: usize, source_layers: usize) -> Result<Vec<Cow<'_, [u8]>>> {
    let arch = g.architecture()?;
    let count_key = format!("{arch}.block_count");
    for (key, value) in g.metadata() {
        if let Value::Array(items) = value {
            if key.starts_with(&format!("{arch}.")) && items.len() == source_layers {
                let msg = format!("metadata key `{key}` holds one value per layer, which expanse cannot extend to the expansion's layers");
                return Err(Error::bad_file(g.path(), msg));
            }
        }
    }
    let count = u32::try_from(layers).map_err(|_| Error::Internal(format!("{layers} layers")))?;
    g.raw_metadata()?
        .into_iter()
        .map(|(key, raw)| if key == count_key { encode_kv(&key, &Value::U32(count)).map(Cow::Owned) } else { Ok(Cow::Borrowed(raw)) })
        .collect()
}

/// Streams every planned tensor into `path` and makes it durable before the rename publishes it.
#[allow(clippy::too_many_arguments)]
fn write_file(
    g: &GgufFile,
    stored: &[StoredTensor<'_>],
    planned: &[Planned],
    entries: &[TensorEntry],
    metadata: &[Cow<'_, [u8]>],
    plan: &Plan,
    path: &Path,
    progress: bool,
) -> Result<()> {
    let total = entries.iter().filter_map(TensorEntry::bytes).sum::<usize>() as u64;
    let bar = if progress { crate::progress::bytes_bar("writing", total) } else { indicatif::ProgressBar::hidden() };
    let alignment = g.alignment();
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = GgufWriter::start(std::io::BufWriter::with_capacity(8 << 20, file), path, metadata, entries, alignment)?;
    for p in planned {
        let t = &stored[p.source];
        bar.set_message(p.name.clone());
        let bytes = scaled(g, t, p.scale, plan.dtype)?;
        w.tensor(&p.name, &bytes)?;
        bar.inc(bytes.len() as u64);
        drop(bytes);
        g.release_stored(t);
    }
    let file = w.finish()?.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    drop(file);
    bar.finish_and_clear();
    set_default_mode(path)
}

/// Tensor `t`'s bytes with `scale` applied: as stored for 1.0; zero blocks of its type for 0.0 (zero
/// in every block type: the scales are zero); a float tensor scaled by mergekit's arithmetic in the
/// plan's dtype `via` (else its own) and stored back in its type. A quantized tensor cannot be
/// scaled by anything else without quantizing again, which would not be the source's blocks.
fn scaled<'a>(g: &GgufFile, t: &StoredTensor<'a>, scale: f64, via: Option<DType>) -> Result<std::borrow::Cow<'a, [u8]>> {
    let dense = dense_type(t.ty);
    if let Some(d) = dense {
        // A NaN or Inf weight would make every logit of the written model NaN.
        if !all_finite(t.bytes, d) {
            return Err(Error::bad_file(g.path(), format!("tensor `{}` holds NaN or infinite values", t.name)));
        }
    }
    match (dense, scale) {
        (_, 1.0) => Ok(std::borrow::Cow::Borrowed(t.bytes)),
        (None, 0.0) => Ok(std::borrow::Cow::Owned(vec![0u8; t.bytes.len()])),
        (None, s) => Err(Error::bad_file(
            g.path(),
            format!("tensor `{}` is {:?} blocks, which the plan scales by {s}: a GGUF's quantized tensors can only be copied or zeroed", t.name, t.ty),
        )),
        (Some(d), s) => {
            let out = transform(t.bytes.to_vec(), d, via.unwrap_or(d), s, d);
            if !all_finite(&out, d) {
                return Err(Error::bad_file(g.path(), format!("tensor `{}` scaled by {s} overflows {}", t.name, crate::config::dtype_hf_name(d))));
            }
            Ok(std::borrow::Cow::Owned(out))
        }
    }
}

/// The types written, as `inspect` names them: `GGUF (float32, q5_0, q8_0)`.
fn type_summary(entries: &[TensorEntry]) -> String {
    let mut names: Vec<String> = entries.iter().map(|e| type_name(e.ty)).collect();
    names.sort();
    names.dedup();
    format!("GGUF ({})", names.join(", "))
}
