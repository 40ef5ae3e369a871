//! Building a model from its weights: each source tensor read once, copies sharing their source's
//! storage, mergekit's scaling, Q/K/V and gate/up stacked, zero projections checked and released.
//!
//! Everything is assembled on the host and each finished weight is uploaded once. On CUDA the
//! stream-ordered memory pool keeps the chunks that load-time temporaries (parts before stacking,
//! f32 scaling, zero checks) shared with weights: built on the GPU, an H200 held 1.1 GB (7 % of the
//! expanded OpenChat) reserved beyond the weights after load (2026-12-04, pool 16064 MiB reserved,
//! 14967 MiB in use). Assembled here, the GPU sees only the weights it keeps.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::{weights_bytes, Attention, Block, Linear, Mlp, Model, Rotary};
use crate::config::Config;
use crate::error::Result;
use crate::expand::{layer_tensor_name, layer_tensor_shape, scale_for, Plan, PROJECTIONS};
use crate::quant::{QMatrix, QuantType};

/// Where weights come from: a checkpoint on disk or random synthetic weights.
pub trait WeightSource {
    /// `name` in its stored dtype on `device`, checked against `shape`. (The model builder asks for
    /// every tensor on the CPU.)
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor>;
    /// `name`'s stored blocks when the source holds it quantized (a GGUF), checked against `shape`;
    /// None when it is stored as floats.
    fn blocks(&mut self, _name: &str, _shape: &[usize]) -> Result<Option<(QuantType, Vec<u8>)>> {
        Ok(None)
    }
    /// Whether the source holds `name` at all (for optional tensors like an untied lm_head).
    fn has(&self, name: &str) -> bool;
    /// The file holding `name`, for errors about its values (None: not read from a file).
    fn location(&self, _name: &str) -> Option<std::path::PathBuf> {
        None
    }
}

fn is_all_zero(t: &Tensor) -> Result<bool> {
    // The first row settles it for any trained or random weight; only candidates pay a full pass.
    let first = t.narrow(0, 0, 1)?;
    if first.ne(0.0)?.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? != 0 {
        return Ok(false);
    }
    Ok(t.ne(0.0)?.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? == 0)
}

/// Multiplies `t` by `value` the way mergekit does: in `t`'s dtype, computed in f32 and rounded once,
/// so 0.0 × a negative weight gives −0.0 as it does there. Element by element into one copy: the
/// composed ops (widen, multiply, narrow) held three copies, two of them f32 — an inserted block's
/// zero `down_proj` of a 7B model made 0.47 GB at once, the load's peak.
fn scale(t: &Tensor, value: f64) -> Result<Tensor> {
    let v = value as f32;
    let flat = t.flatten_all()?;
    let out = match t.dtype() {
        DType::BF16 => {
            Tensor::from_vec(flat.to_vec1::<bf16>()?.into_iter().map(|x| bf16::from_f32(x.to_f32() * v)).collect::<Vec<_>>(), t.shape(), t.device())?
        }
        DType::F16 => Tensor::from_vec(flat.to_vec1::<f16>()?.into_iter().map(|x| f16::from_f32(x.to_f32() * v)).collect::<Vec<_>>(), t.shape(), t.device())?,
        DType::F32 => Tensor::from_vec(flat.to_vec1::<f32>()?.into_iter().map(|x| x * v).collect::<Vec<_>>(), t.shape(), t.device())?,
        dtype => t.to_dtype(DType::F32)?.broadcast_mul(&Tensor::new(v, t.device())?)?.to_dtype(dtype)?,
    };
    Ok(out)
}

/// Loads each source tensor once, so every copy of a layer shares the same storage.
struct Builder<'a> {
    source: &'a mut dyn WeightSource,
    device: &'a Device,
    dtype: DType,
    scale_dtype: Option<DType>,
    /// The plan's YAML (it set `scale_dtype`), for errors.
    plan_spec: &'a str,
    /// name → (tensor in the dtype scaling happens in, tensor in the run dtype), on the host
    loaded: HashMap<String, (Tensor, Tensor)>,
    /// name → the unscaled run-dtype tensor on `device`, for norms and embeddings that copies share
    placed: HashMap<String, Tensor>,
    /// Projections by (part names, scales), with whether they are all zeros: copies with the same
    /// parts share one weight.
    built: HashMap<String, (Linear, bool)>,
    /// name → projections still to build from it; at zero the tensor as read is released, so loading
    /// holds a layer's projections twice only while that layer is being built (and, with `--quant`,
    /// never the whole model in its dense dtype).
    uses: HashMap<String, usize>,
    /// `--quant`: the type projections are quantized to as they are built.
    quant: Option<QuantType>,
}

/// One stacked projection of an output layer: (source tensor name, shape, scale) per part.
type Group = Vec<(String, Vec<usize>, f64)>;

fn group_key(parts: &Group) -> String {
    parts.iter().map(|(n, _, v)| format!("{n}*{:x}", v.to_bits())).collect::<Vec<_>>().join("|")
}

/// Whether casting `from` to `to` can turn a finite value infinite: a narrower range (f16's
/// ±65504), or the same range with fewer digits, where the largest values round up past it.
fn cast_can_overflow(from: DType, to: DType) -> bool {
    match to {
        DType::F16 => from != DType::F16,
        DType::BF16 => matches!(from, DType::F32 | DType::F64),
        DType::F32 => from == DType::F64,
        _ => false,
    }
}

/// Whether every value of float tensor `t` is finite (its extremes are: a cast makes ±Inf, not NaN).
fn all_finite(t: &Tensor) -> Result<bool> {
    let at = |x: Tensor| -> Result<f32> { Ok(x.to_dtype(DType::F32)?.to_scalar::<f32>()?) };
    Ok(at(t.max_all()?)?.is_finite() && at(t.min_all()?)?.is_finite())
}

/// The value of `t` largest in magnitude, for messages.
fn extreme(t: &Tensor) -> Result<f64> {
    let at = |x: Tensor| -> Result<f64> { Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let (hi, lo) = (at(t.max_all()?)?, at(t.min_all()?)?);
    Ok(if lo.abs() > hi.abs() { lo } else { hi })
}

/// Which cast a weight went through, for the error when it overflowed.
#[derive(Clone, Copy)]
enum Cast {
    /// To the dtype the model runs in (`--dtype`).
    Run,
    /// To the dtype the plan's YAML scales in (its `dtype`).
    Merge,
}

impl Builder<'_> {
    fn get(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Tensor> {
        if !self.loaded.contains_key(name) {
            let t = self.source.tensor(name, shape, &Device::Cpu)?;
            let stored = match self.scale_dtype {
                Some(d) => self.cast(name, &t, d, Cast::Merge)?,
                None => t,
            };
            let run = self.cast(name, &stored, self.dtype, Cast::Run)?;
            self.loaded.insert(name.to_string(), (stored, run));
        }
        let (stored, run) = &self.loaded[name];
        if value == 1.0 {
            // Shared: a copied layer holds the same storage as its source.
            return Ok(run.clone());
        }
        let scaled = scale(stored, value)?;
        if value.abs() > 1.0 && !all_finite(&scaled)? {
            return Err(self.overflow(name, stored, value, stored.dtype(), Cast::Merge));
        }
        let out = scaled.to_dtype(self.dtype)?;
        if cast_can_overflow(scaled.dtype(), self.dtype) && !all_finite(&out)? {
            return Err(self.overflow(name, stored, value, self.dtype, Cast::Run));
        }
        Ok(out)
    }

    /// Weight `name` (a norm or an embedding) on the model's device: `get`'s tensor uploaded, once
    /// for every use that shares it (scale 1).
    fn weight(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Tensor> {
        if value == 1.0 {
            if let Some(t) = self.placed.get(name) {
                return Ok(t.clone());
            }
        }
        let t = self.get(name, shape, value)?.to_device(self.device)?;
        if value == 1.0 {
            self.placed.insert(name.to_string(), t.clone());
        }
        Ok(t)
    }

    /// `t` cast to `dtype`, refusing a cast that makes a finite weight infinite.
    fn cast(&self, name: &str, t: &Tensor, dtype: DType, why: Cast) -> Result<Tensor> {
        let out = t.to_dtype(dtype)?;
        if cast_can_overflow(t.dtype(), dtype) && !all_finite(&out)? {
            return Err(self.overflow(name, t, 1.0, dtype, why));
        }
        Ok(out)
    }

    /// The error for weight `name` (values `t`, times `scale`) out of `dtype`'s range, naming its file.
    fn overflow(&self, name: &str, t: &Tensor, scale: f64, dtype: DType, why: Cast) -> crate::Error {
        let value = match extreme(t) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let (whose, fix) = match why {
            Cast::Run => (String::new(), "run it in bf16 or f32 (--dtype bf16)"),
            Cast::Merge => (format!(", the dtype of {}", self.plan_spec), "set the YAML's dtype to bfloat16 or float32 (or lower its scale)"),
        };
        let msg = crate::loader::out_of_range(name, value, scale, dtype, &whose, fix);
        match self.source.location(name) {
            Some(path) => crate::Error::bad_file(path, msg),
            None => crate::Error::flag("--dtype", msg),
        }
    }

    /// The projection made of `group`'s parts stacked along rows (built once per distinct group),
    /// quantized when `--quant` asks, and whether it is all zeros (checked before quantizing).
    fn projection(&mut self, group: &Group) -> Result<(Linear, bool)> {
        let key = group_key(group);
        if let Some(p) = self.built.get(&key) {
            return Ok(p.clone());
        }
        if let Some(stored) = self.stored_projection(group)? {
            self.release_parts(group);
            self.built.insert(key, stored.clone());
            return Ok(stored);
        }
        // Part by part: each is released (when no other projection needs it) and, with `--quant`,
        // quantized before the next is read, so a layer's gate and up are never held together.
        let (rows, cols) = (group.iter().map(|(_, shape, _)| shape[0]).sum(), group[0].1[1]);
        let mut stack = Stack::new(&group[0].0, rows, cols, self.quant);
        let mut zero = true;
        for (name, shape, value) in group {
            let part = self.get(name, shape, *value)?;
            self.release(name);
            zero = zero && is_all_zero(&part)?;
            stack.push(part)?;
        }
        let linear = stack.finish(self.device)?;
        self.built.insert(key, (linear.clone(), zero));
        Ok((linear, zero))
    }

    /// `group` from the blocks the source stores it in (a quantized GGUF), kept as they are: the parts'
    /// blocks stacked (rows are whole blocks; parts of different types, as a Q4_K_M file's v beside
    /// q/k, stay separate runs of the stack), a zero-scaled part (an inserted block's o_proj/down_proj)
    /// as zero blocks of its type, and whether it is all zeros. None for float parts.
    fn stored_projection(&mut self, group: &Group) -> Result<Option<(Linear, bool)>> {
        let mut found = Vec::with_capacity(group.len());
        for (name, shape, _) in group {
            found.push(self.source.blocks(name, shape)?);
        }
        if found.iter().all(Option::is_none) {
            return Ok(None);
        }
        let Some(stored) = found.into_iter().collect::<Option<Vec<_>>>() else { return Err(self.floats_beside_blocks(group)) };
        let mut zero = true;
        let mut runs: Vec<(Vec<u8>, usize, QuantType)> = Vec::with_capacity(group.len());
        for ((name, shape, value), (ty, bytes)) in group.iter().zip(stored) {
            let bytes = if *value == 0.0 {
                // Blocks never cross a row: one zero row's blocks, repeated (a whole f32 zero
                // tensor of a 7B down_proj would be 0.23 GB).
                let row = crate::quant::quantize_to_bytes(name, &Tensor::zeros((1, shape[1]), DType::F32, &Device::Cpu)?, ty)?;
                row.repeat(shape[0])
            } else if *value == 1.0 {
                let raw =
                    crate::quant::gguf::RawTensor { ty: crate::quant::gguf::StoredType::Quantized(ty), shape: shape.clone(), bytes: bytes.as_slice().into() };
                zero = zero && raw.is_zero()?;
                bytes
            } else {
                let msg = format!("tensor `{name}` is stored as {} blocks, which cannot be scaled by {value} as {} asks", ty.name(), self.plan_spec);
                return Err(crate::Error::bad_file(self.source.location(name).unwrap_or_default(), msg));
            };
            runs.push((bytes, shape[0], ty));
        }
        let runs: Vec<(&[u8], usize, QuantType)> = runs.iter().map(|(b, r, t)| (b.as_slice(), *r, *t)).collect();
        Ok(Some((Linear::Quantized(QMatrix::stacked(&group[0].0, &runs, group[0].1[1], self.device)?), zero)))
    }

    /// The error for a stacked projection with some parts stored as floats and some as blocks.
    fn floats_beside_blocks(&self, group: &Group) -> crate::Error {
        let names: Vec<&str> = group.iter().map(|(n, _, _)| n.as_str()).collect();
        let msg = format!("{}: some are stored as floats, some as quantized blocks; one stacked projection of both is not supported", names.join(", "));
        crate::Error::bad_file(self.source.location(&group[0].0).unwrap_or_default(), msg)
    }

    /// The weight stacking `parts` (rows) as the model holds it, on its device (see [`Stack`]).
    fn finish(&self, name: &str, parts: Vec<Tensor>) -> Result<Linear> {
        let rows = parts.iter().map(|p| p.dim(0)).sum::<candle_core::Result<usize>>()?;
        let cols = match parts.first() {
            Some(p) => p.dim(1)?,
            None => return Err(crate::Error::internal(format!("{name}: a projection of no parts"))),
        };
        let mut stack = Stack::new(name, rows, cols, self.quant);
        for p in parts {
            stack.push(p)?;
        }
        stack.finish(self.device)
    }

    /// Output layer `out`'s zero projections, released by `block`, are its zero views from now on: a
    /// later copy with the same parts gets the view, and the built zeros are freed.
    fn release_zero_projections(&mut self, cfg: &Config, plan: &Plan, out: usize, block: &Block) {
        for (parts, released) in [(O, &block.self_attn.o_proj), (DOWN, &block.mlp.down_proj)] {
            if let Some((linear, true)) = self.built.get_mut(&group_key(&group(cfg, plan, out, parts))) {
                *linear = released.clone();
            }
        }
    }

    /// One use of each of `group`'s tensors is done.
    fn release_parts(&mut self, group: &Group) {
        for (name, _, _) in group {
            self.release(name);
        }
    }

    /// One use of tensor `name` is done: when no projection still needs it, it is released.
    fn release(&mut self, name: &str) {
        let left = self.uses.get_mut(name).map(|n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left == Some(0) {
            self.loaded.remove(name);
        }
    }
}

/// A projection's parts stacked along rows as the model holds it: dense, or quantized to `--quant`'s
/// type (or llama-quantize's fallback for its width; kept dense when no type fits, as llama.cpp keeps
/// such a tensor in F16). Blocks never cross a row, so each part is quantized as it is pushed, into one
/// buffer of the stack's size: the dense stack is never built, and a part is dropped once in it.
enum Stack {
    Dense(Vec<Tensor>),
    Quantized { name: String, rows: usize, cols: usize, ty: QuantType, data: Vec<u8> },
}

impl Stack {
    fn new(name: &str, rows: usize, cols: usize, quant: Option<QuantType>) -> Stack {
        match quant.and_then(|q| q.for_width(cols)) {
            Some(ty) => Stack::Quantized { name: name.to_string(), rows, cols, ty, data: Vec::with_capacity(ty.bytes_for(rows, cols)) },
            None => Stack::Dense(Vec::new()),
        }
    }

    fn push(&mut self, part: Tensor) -> Result<()> {
        match self {
            Stack::Dense(parts) => parts.push(part),
            Stack::Quantized { name, ty, data, .. } => data.extend(crate::quant::quantize_to_bytes(name, &part, *ty)?),
        }
        Ok(())
    }

    fn finish(self, device: &Device) -> Result<Linear> {
        Ok(match self {
            Stack::Dense(parts) if parts.len() == 1 => Linear::Dense(parts[0].to_device(device)?),
            Stack::Dense(parts) => Linear::Dense(Tensor::cat(&parts, 0)?.to_device(device)?),
            Stack::Quantized { name, rows, cols, ty, data } => Linear::Quantized(QMatrix::from_bytes(&name, &data, rows, cols, ty, device)?),
        })
    }
}

const QKV: &[&str] = PROJECTIONS[0];
const GATE_UP: &[&str] = PROJECTIONS[1];
const O: &[&str] = PROJECTIONS[2];
const DOWN: &[&str] = PROJECTIONS[3];

/// `dims` of zeros backed by a single element (a stride-0 view): what a skipped block keeps of its
/// zero projections.
fn zero_view(dims: (usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((1, 1), dtype, device)?.broadcast_as(dims)?)
}

impl Model {
    /// Builds the output stack of `plan` from `source`. Tensors are cast to `dtype` on `device`;
    /// scaled tensors are scaled in the plan's dtype (or the stored one) first, as mergekit does.
    /// Q/K/V and gate/up are stacked into one weight each (the separate projections are views of
    /// it). With `skip_transparent`, blocks verified transparent release their zero projections as
    /// soon as they are checked and are skipped in `forward`. With `quant`, every projection and the
    /// lm_head are quantized to it as they are built (embeddings and norms stay in `dtype`).
    pub fn load(
        cfg: &Config,
        plan: &Plan,
        source: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
        skip_transparent: bool,
        quant: Option<QuantType>,
    ) -> Result<Model> {
        let mut b = Builder {
            source,
            device,
            dtype,
            scale_dtype: plan.dtype,
            plan_spec: &plan.spec,
            loaded: HashMap::new(),
            placed: HashMap::new(),
            built: HashMap::new(),
            uses: projection_uses(cfg, plan),
            quant,
        };
        let h = cfg.hidden_size;
        let embed_name = "model.embed_tokens.weight";
        let embed_scale = scale_for(&plan.embed_scale, embed_name);
        let embed_tokens = b.weight(embed_name, &[cfg.vocab_size, h], embed_scale)?;
        let mut blocks = Vec::with_capacity(plan.layers.len());
        for out in 0..plan.layers.len() {
            let mut block = b.block(cfg, plan, out)?;
            if block.transparent && skip_transparent {
                // Released now rather than after the loop, so at most one block's zeros are alive.
                block.release_zero_projections()?;
                b.release_zero_projections(cfg, plan, out, &block);
            }
            blocks.push(block);
            return_freed_memory();
        }
        let norm = b.weight("model.norm.weight", &[h], scale_for(&plan.head_scale, "model.norm.weight"))?;
        let head = vec![("lm_head.weight".to_string(), vec![cfg.vocab_size, h], scale_for(&plan.head_scale, "lm_head.weight"))];
        let lm_head = if cfg.tie_word_embeddings {
            // A GGUF's tied output is its token_embd blocks multiplied as they are, as llama.cpp runs
            // them (not the dequantized copy the embedding lookup reads: that rounds no activations).
            // Blocks cannot be scaled: a plan that scales the embedding multiplies its scaled copy.
            let stored = match embed_scale == 1.0 {
                true => b.stored_projection(&vec![(embed_name.to_string(), vec![cfg.vocab_size, h], 1.0)])?,
                false => None,
            };
            match stored {
                Some((stored, _)) => stored,
                None => b.finish("lm_head.weight", vec![embed_tokens.clone()])?,
            }
        } else if let Some((stored, _)) = b.stored_projection(&head)? {
            stored
        } else {
            let w = b.get("lm_head.weight", &[cfg.vocab_size, h], head[0].2)?;
            b.finish("lm_head.weight", vec![w])?
        };
        drop(b);
        return_freed_memory();
        let rotary = Rotary::new(cfg, dtype, device)?;
        let mut config = cfg.clone();
        config.num_hidden_layers = blocks.len();
        let mut model = Model {
            config,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rotary,
            unit_norm: Tensor::ones(h, DType::F32, device)?,
            dtype,
            device: device.clone(),
            skip_transparent,
            weight_bytes: 0,
            quant: None,
        };
        // `--quant`'s type, or the type a quantized file stores its projections in.
        let stored = model.projections().find_map(|l| l.quantized().map(|q| q.quant_type()));
        model.quant = stored.and(quant).or(stored);
        model.weight_bytes = weights_bytes(model.weights());
        Ok(model)
    }
}

/// Hands the memory a layer's load freed (its source tensors, their f32 chunks, blocks on their way
/// into storage) back to the system. glibc keeps freed memory in its per-thread arenas, where the
/// layers' differently sized pieces fragment it: a 40-layer Q4_K load kept 0.46 GB of freed memory
/// resident after loading, and trimming after each layer lowered its peak by 0.3 GB (measured,
/// BENCHMARKS.md). Elsewhere a no-op.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The parts of output layer `out`'s stacked weight made of `suffixes`, with their shapes and scales.
fn group(cfg: &Config, plan: &Plan, out: usize, suffixes: &[&str]) -> Group {
    let src = plan.layers[out].source;
    suffixes.iter().map(|s| (layer_tensor_name(src, s), layer_tensor_shape(cfg, s), plan.layer_scale(out, s))).collect()
}

/// How many distinct projections each source tensor goes into (`Builder::uses`).
fn projection_uses(cfg: &Config, plan: &Plan) -> HashMap<String, usize> {
    let mut uses: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for out in 0..plan.layers.len() {
        for parts in PROJECTIONS {
            let g = group(cfg, plan, out, parts);
            if seen.insert(group_key(&g)) {
                for (name, _, _) in g {
                    *uses.entry(name).or_default() += 1;
                }
            }
        }
    }
    uses
}

impl Builder<'_> {
    /// Output layer `out` of `plan`: its source layer's tensors, scaled as the plan says, Q/K/V and
    /// gate/up stacked (the separate projections are views of the stacks).
    fn block(&mut self, cfg: &Config, plan: &Plan, out: usize) -> Result<Block> {
        let src = plan.layers[out].source;
        let mut get = |suffix: &str| self.weight(&layer_tensor_name(src, suffix), &layer_tensor_shape(cfg, suffix), plan.layer_scale(out, suffix));
        let input_layernorm = get("input_layernorm.weight")?;
        let post_attention_layernorm = get("post_attention_layernorm.weight")?;
        let (o_proj, o_zero) = self.projection(&group(cfg, plan, out, O))?;
        let (down_proj, down_zero) = self.projection(&group(cfg, plan, out, DOWN))?;
        let (qkv, _) = self.projection(&group(cfg, plan, out, QKV))?;
        let (gate_up, _) = self.projection(&group(cfg, plan, out, GATE_UP))?;
        let (nq, nkv, i) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size);
        let transparent = o_zero && down_zero;
        let self_attn = Attention {
            q_proj: qkv.rows(0, nq)?,
            k_proj: qkv.rows(nq, nkv)?,
            v_proj: qkv.rows(nq + nkv, nkv)?,
            qkv_proj: qkv,
            o_proj,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
        };
        let mlp = Mlp { gate_proj: gate_up.rows(0, i)?, up_proj: gate_up.rows(i, i)?, gate_up_proj: gate_up, down_proj };
        Ok(Block { input_layernorm, self_attn, post_attention_layernorm, mlp, source: src, eps: cfg.rms_norm_eps as f32, transparent })
    }
}

impl Block {
    /// Replaces the (verified zero) o_proj and down_proj by zero views, freeing their storage.
    pub(super) fn release_zero_projections(&mut self) -> Result<()> {
        let (dtype, device) = (self.input_layernorm.dtype(), self.input_layernorm.device().clone());
        self.self_attn.o_proj = Linear::Dense(zero_view(self.self_attn.o_proj.dims(), dtype, &device)?);
        self.mlp.down_proj = Linear::Dense(zero_view(self.mlp.down_proj.dims(), dtype, &device)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{rand_tensor, rng};

    /// `scale` gives the bits of candle's composed ops (widen to f32, multiply, round back) on fresh
    /// random weights, −0.0 from 0.0 × a negative weight included.
    #[test]
    fn scale_rounds_once_as_composed_ops_do() {
        let mut rng = rng("scale_rounds_once_as_composed_ops_do");
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let t = rand_tensor(&mut rng, &[37, 64], 3.0, dtype, &Device::Cpu);
            for value in [0.0, 0.5, 1.7, -2.0, 1e-3] {
                let want = t.to_dtype(DType::F32).unwrap().broadcast_mul(&Tensor::new(value as f32, &Device::Cpu).unwrap()).unwrap().to_dtype(dtype).unwrap();
                let got = scale(&t, value).unwrap();
                assert_eq!(got.dims(), t.dims());
                assert_eq!(got.dtype(), dtype);
                let bytes = |t: &Tensor| crate::loader::tensor_bytes(t).unwrap();
                assert!(bytes(&got) == bytes(&want), "{dtype:?} × {value}: bits differ from the composed ops");
            }
            let negative_zeros = scale(&t, 0.0).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(negative_zeros.iter().any(|x| *x == 0.0 && x.is_sign_negative()), "{dtype:?}: no −0.0 from 0.0 × a negative weight");
        }
    }
}
