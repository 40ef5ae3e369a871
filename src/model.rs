//! The decoder: a Mistral/Llama forward pass over an (expanded) layer stack whose copied layers share
//! their source's weights, with a KV cache that is written in place rather than rebuilt each step.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};

use crate::config::Config;
use crate::error::Result;
use crate::expand::{layer_tensor_name, layer_tensor_shape, scale_for, Plan};

/// Where weights come from: a checkpoint on disk or random synthetic weights.
pub trait WeightSource {
    /// `name` in its stored dtype on `device`, checked against `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor>;
    /// Whether the source holds `name` at all (for optional tensors like an untied lm_head).
    fn has(&self, name: &str) -> bool;
}

/// A bias-free projection `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor, // [out, in]
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (out, inp) = self.weight.dims2()?;
        let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, inp))?;
        // Decode's single row: a threaded GEMV on the CPU instead of candle's one-thread gemm
        // (which, in bf16, also widens the whole weight to f32 on every call).
        let y = match crate::cpu_kernels::gemv(&x2, &self.weight) {
            Some(y) => y?,
            // candle's CPU bf16 matmul widens its operands' whole storage to f32; for a view into
            // a stacked weight that is the whole stack. Widening just the view gives the same
            // numbers (f32 products, one rounding per output) for a third of the work.
            None if x2.dtype() == DType::BF16 && x2.device().is_cpu() => x2
                .to_dtype(DType::F32)?
                .matmul(&self.weight.to_dtype(DType::F32)?.t()?)?
                .to_dtype(DType::BF16)?,
            None => x2.matmul(&self.weight.t()?)?,
        };
        let mut shape = lead;
        shape.push(out);
        y.reshape(shape)
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v stacked, so one matmul (one GEMV fork/join in decode) produces all three.
    pub qkv_proj: Linear, // [(n_heads + 2·n_kv_heads)·head_dim, hidden]
    pub q_proj: Linear, // [n_heads·head_dim, hidden], rows of qkv_proj (shared storage)
    pub k_proj: Linear, // [n_kv_heads·head_dim, hidden], rows of qkv_proj
    pub v_proj: Linear, // [n_kv_heads·head_dim, hidden], rows of qkv_proj
    pub o_proj: Linear, // [hidden, n_heads·head_dim]
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate and up stacked: one matmul for both.
    pub gate_up_proj: Linear, // [2·intermediate, hidden]
    pub gate_proj: Linear, // [intermediate, hidden], rows of gate_up_proj (shared storage)
    pub up_proj: Linear,   // [intermediate, hidden], rows of gate_up_proj
    pub down_proj: Linear, // [hidden, intermediate]
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = if is_single_row(x) {
            // Decode: one GEMV over the stacked weight (one fork/join instead of two).
            let gate_up = self.gate_up_proj.forward(x)?;
            let (last, i) = (gate_up.rank() - 1, self.up_proj.weight.dim(0)?);
            (gate_up.narrow(last, 0, i)?, gate_up.narrow(last, i, i)?)
        } else {
            // Prompts: two matmuls measured faster than one over the stacked weight (contiguous outputs).
            (self.gate_proj.forward(x)?, self.up_proj.forward(x)?)
        };
        self.down_proj.forward(&(silu(&gate)? * up)?)
    }
}

/// One token of one sequence: the decode step, where stacked projections pay off.
fn is_single_row(x: &Tensor) -> bool {
    x.dims()[..x.rank().saturating_sub(1)].iter().product::<usize>() == 1
}

/// One decoder layer of the output stack.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Tensor, // [hidden]
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor, // [hidden]
    pub mlp: Mlp,
    /// Source layer in the checkpoint this block was built from.
    pub source: usize,
    eps: f32,
    /// o_proj and down_proj were checked, element by element, to be exactly zero at load time:
    /// the block adds nothing to the residual stream and may be skipped.
    pub transparent: bool,
}

/// Per-layer key/value buffers `[b, n_kv_heads, capacity, head_dim]`, filled in place.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The KV cache of one conversation for one model.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
}

impl Cache {
    pub fn new(model: &Model) -> Cache {
        Cache { layers: vec![LayerKv::default(); model.blocks.len()], len: 0, capacity: 0 }
    }

    /// Tokens already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = LayerKv::default());
        self.len = 0;
        self.capacity = 0;
    }

    /// Drops everything after the first `len` tokens (the buffers stay).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `k`, `v` (`[b, n_kv, s, d]`) at the current position of `layer` and returns views of
    /// everything cached so far. Buffers grow by doubling, so a long generation copies the cache
    /// O(log n) times instead of once per token.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor, max_len: usize) -> Result<(Tensor, Tensor)> {
        let (b, n_kv, s, d) = k.dims4()?;
        let need = self.len + s;
        let slot = &mut self.layers[layer];
        let cap = slot.k.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(cap * 2).max(256).min(max_len.max(need));
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, n_kv, new_cap, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    if self.len > 0 {
                        buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(buf)
            };
            slot.k = Some(grow(&slot.k)?);
            slot.v = Some(grow(&slot.v)?);
        }
        let (kb, vb) = match (&slot.k, &slot.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => unreachable!("buffers were allocated above"),
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

/// Which positions' logits `forward` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// What one block did to the residual stream, for `verify`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockTrace {
    pub layer: usize,
    pub source: usize,
    /// ‖out − in‖ / ‖in‖ over all positions of the call (Frobenius, f32).
    pub relative_delta: f64,
    /// The block's output equals its input bit for bit (−0.0 and +0.0 count as equal).
    pub identical: bool,
    pub skipped: bool,
}

/// Rotary tables `[max_position, head_dim/2]`, computed in f32 and cast once to the model dtype.
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Rotary> {
        let d = cfg.head_dim;
        let theta = cfg.rope_theta as f32;
        // Matches transformers: inv_freq = 1 / θ^(2i/d) in f32, angles = position · inv_freq in f32.
        let inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
        let n = cfg.max_position_embeddings;
        let mut angles = Vec::with_capacity(n * d / 2);
        for p in 0..n {
            angles.extend(inv_freq.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (n, d / 2), &Device::Cpu)?;
        Ok(Rotary {
            cos: angles.cos()?.to_dtype(dtype)?.to_device(device)?,
            sin: angles.sin()?.to_dtype(dtype)?.to_device(device)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub embed_tokens: Tensor, // [vocab, hidden]
    pub blocks: Vec<Block>,
    pub norm: Tensor, // [hidden]
    pub lm_head: Linear, // [vocab, hidden], may share embed_tokens' storage
    rotary: Rotary,
    pub dtype: DType,
    pub device: Device,
    /// Skip blocks whose projections were verified to be zero (`--skip-transparent`); their zero
    /// projections were released, so this cannot be turned off again.
    skip_transparent: bool,
    /// Bytes of distinct weight storage held (copies sharing a source count once).
    pub weight_bytes: usize,
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
/// so 0.0 × a negative weight gives −0.0 as it does there.
fn scale(t: &Tensor, value: f64) -> Result<Tensor> {
    let dtype = t.dtype();
    let s = Tensor::new(value as f32, t.device())?;
    Ok(t.to_dtype(DType::F32)?.broadcast_mul(&s)?.to_dtype(dtype)?)
}

/// Loads each source tensor once, so every copy of a layer shares the same storage.
struct Builder<'a> {
    source: &'a mut dyn WeightSource,
    device: &'a Device,
    dtype: DType,
    scale_dtype: Option<DType>,
    /// name → (tensor in the dtype scaling happens in, tensor in the run dtype)
    loaded: HashMap<String, (Tensor, Tensor)>,
    /// Stacked projections by (part names, scales): copies with the same parts share one tensor.
    fused: HashMap<String, Tensor>,
    /// name → stacked groups still to build from it; at zero the unstacked tensor is released, so
    /// loading holds a layer's projections twice only while that layer is being stacked.
    uses: HashMap<String, usize>,
}

/// One stacked projection of an output layer: (source tensor name, shape, scale) per part.
type Group = Vec<(String, Vec<usize>, f64)>;

fn group_key(parts: &Group) -> String {
    parts.iter().map(|(n, _, v)| format!("{n}*{:x}", v.to_bits())).collect::<Vec<_>>().join("|")
}

impl Builder<'_> {
    fn get(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Tensor> {
        if !self.loaded.contains_key(name) {
            let t = self.source.tensor(name, shape, self.device)?;
            let stored = match self.scale_dtype {
                Some(d) => t.to_dtype(d)?,
                None => t,
            };
            let run = stored.to_dtype(self.dtype)?;
            self.loaded.insert(name.to_string(), (stored, run));
        }
        let (stored, run) = &self.loaded[name];
        if value == 1.0 {
            // Shared: a copied layer holds the same storage as its source.
            return Ok(run.clone());
        }
        Ok(scale(stored, value)?.to_dtype(self.dtype)?)
    }

    /// The parts of `group` stacked along rows (built once per distinct group).
    fn stacked(&mut self, group: &Group) -> Result<Tensor> {
        let key = group_key(group);
        if let Some(t) = self.fused.get(&key) {
            return Ok(t.clone());
        }
        let mut parts = Vec::with_capacity(group.len());
        for (name, shape, value) in group {
            parts.push(self.get(name, shape, *value)?);
        }
        let t = Tensor::cat(&parts, 0)?;
        for (name, _, _) in group {
            let left = self.uses.get_mut(name).map(|n| {
                *n = n.saturating_sub(1);
                *n
            });
            if left == Some(0) {
                self.loaded.remove(name);
            }
        }
        self.fused.insert(key, t.clone());
        Ok(t)
    }
}

const QKV: [&str; 3] = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"];
const GATE_UP: [&str; 2] = ["mlp.gate_proj.weight", "mlp.up_proj.weight"];

/// Bytes of distinct storage behind `tensors`: views and copies of one allocation count once, and a
/// broadcast view counts only the elements it reaches.
pub fn storage_bytes<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> usize {
    let mut reach: HashMap<usize, usize> = HashMap::new();
    for t in tensors {
        if t.elem_count() == 0 {
            continue;
        }
        let key = storage_key(t);
        let layout = t.layout();
        let last: usize = layout.dims().iter().zip(layout.stride()).map(|(d, s)| (d - 1) * s).sum();
        let end = (layout.start_offset() + last + 1) * t.dtype().size_in_bytes();
        let e = reach.entry(key).or_default();
        *e = (*e).max(end);
    }
    reach.values().sum()
}

/// Identity of the allocation behind `t` (views and clones of one tensor share it).
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const candle_core::Storage as usize
}

/// Whether `a` and `b` are views of one allocation (a copied layer and its source, or a projection
/// and the stacked weight it is part of).
pub fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    storage_key(a) == storage_key(b)
}

/// `t`'s shape of zeros backed by a single element (a stride-0 view): what a skipped block keeps of
/// its zero projections.
fn zero_view(t: &Tensor) -> Result<Tensor> {
    let one = Tensor::zeros(vec![1; t.rank()], t.dtype(), t.device())?;
    Ok(one.broadcast_as(t.dims())?)
}

impl Model {
    /// Builds the output stack of `plan` from `source`. Tensors are cast to `dtype` on `device`;
    /// scaled tensors are scaled in the plan's dtype (or the stored one) first, as mergekit does.
    /// Q/K/V and gate/up are stacked into one weight each (the separate projections are views of
    /// it). With `skip_transparent`, blocks verified transparent release their zero projections as
    /// soon as they are checked and are skipped in `forward`.
    pub fn load(
        cfg: &Config,
        plan: &Plan,
        source: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
        skip_transparent: bool,
    ) -> Result<Model> {
        let group = |out: usize, suffixes: &[&str]| -> Group {
            let src = plan.layers[out].source;
            suffixes
                .iter()
                .map(|s| (layer_tensor_name(src, s), layer_tensor_shape(cfg, s), plan.layer_scale(out, s)))
                .collect()
        };
        let mut uses: HashMap<String, usize> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for out in 0..plan.layers.len() {
            for g in [group(out, &QKV), group(out, &GATE_UP)] {
                if seen.insert(group_key(&g)) {
                    for (name, _, _) in g {
                        *uses.entry(name).or_default() += 1;
                    }
                }
            }
        }
        let mut b = Builder {
            source,
            device,
            dtype,
            scale_dtype: plan.dtype,
            loaded: HashMap::new(),
            fused: HashMap::new(),
            uses,
        };
        let h = cfg.hidden_size;
        let embed_name = "model.embed_tokens.weight";
        let embed_tokens = b.get(embed_name, &[cfg.vocab_size, h], scale_for(&plan.embed_scale, embed_name))?;
        let mut blocks = Vec::with_capacity(plan.layers.len());
        for (out, lp) in plan.layers.iter().enumerate() {
            let mut get = |suffix: &str| b.get(&layer_tensor_name(lp.source, suffix), &layer_tensor_shape(cfg, suffix), plan.layer_scale(out, suffix));
            let input_layernorm = get("input_layernorm.weight")?;
            let post_attention_layernorm = get("post_attention_layernorm.weight")?;
            let o_proj = get("self_attn.o_proj.weight")?;
            let down_proj = get("mlp.down_proj.weight")?;
            let qkv = b.stacked(&group(out, &QKV))?;
            let gate_up = b.stacked(&group(out, &GATE_UP))?;
            let (nq, nkv, i) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size);
            let lin = |w: Tensor| Linear { weight: w };
            let transparent = is_all_zero(&o_proj)? && is_all_zero(&down_proj)?;
            let self_attn = Attention {
                q_proj: lin(qkv.narrow(0, 0, nq)?),
                k_proj: lin(qkv.narrow(0, nq, nkv)?),
                v_proj: lin(qkv.narrow(0, nq + nkv, nkv)?),
                qkv_proj: lin(qkv),
                o_proj: lin(o_proj),
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                sliding_window: cfg.sliding_window,
            };
            let mlp = Mlp {
                gate_proj: lin(gate_up.narrow(0, 0, i)?),
                up_proj: lin(gate_up.narrow(0, i, i)?),
                gate_up_proj: lin(gate_up),
                down_proj: lin(down_proj),
            };
            let mut block = Block {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                mlp,
                source: lp.source,
                eps: cfg.rms_norm_eps as f32,
                transparent,
            };
            if transparent && skip_transparent {
                // Released now rather than after the loop, so at most one block's zeros are alive.
                block.release_zero_projections()?;
            }
            blocks.push(block);
        }
        let norm = b.get("model.norm.weight", &[h], scale_for(&plan.head_scale, "model.norm.weight"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            b.get("lm_head.weight", &[cfg.vocab_size, h], scale_for(&plan.head_scale, "lm_head.weight"))?
        };
        drop(b);
        let rotary = Rotary::new(cfg, dtype, device)?;
        let mut config = cfg.clone();
        config.num_hidden_layers = blocks.len();
        let mut model = Model {
            config,
            embed_tokens,
            blocks,
            norm,
            lm_head: Linear { weight: lm_head },
            rotary,
            dtype,
            device: device.clone(),
            skip_transparent,
            weight_bytes: 0,
        };
        model.weight_bytes = storage_bytes(model.weights());
        Ok(model)
    }

    /// Every weight tensor the model holds (views of stacked weights included; see `storage_bytes`).
    pub fn weights(&self) -> impl Iterator<Item = &Tensor> {
        [&self.embed_tokens, &self.norm, &self.lm_head.weight]
            .into_iter()
            .chain(self.blocks.iter().flat_map(|b| b.tensors()))
    }

    /// Skips the blocks verified transparent at load time from now on, and releases their zero
    /// projections (a stride-0 view of one zero stays, so `tensors()` still reads as zeros).
    pub fn skip_transparent(&mut self) -> Result<()> {
        for b in self.blocks.iter_mut().filter(|b| b.transparent) {
            b.release_zero_projections()?;
        }
        self.skip_transparent = true;
        self.weight_bytes = storage_bytes(self.weights());
        Ok(())
    }

    /// Whether `forward` skips the transparent blocks.
    pub fn skips_transparent(&self) -> bool {
        self.skip_transparent
    }

    /// Whether `forward` executes `block` (every block, unless skipping the transparent ones).
    pub fn runs(&self, block: &Block) -> bool {
        !(self.skip_transparent && block.transparent)
    }

    /// Output layers whose block was verified transparent at load time.
    pub fn transparent_layers(&self) -> Vec<usize> {
        self.blocks.iter().enumerate().filter(|(_, b)| b.transparent).map(|(i, _)| i).collect()
    }

    /// The same weights with only the blocks in `keep` (shares every tensor).
    pub fn with_blocks(&self, keep: &[usize]) -> Model {
        let mut m = self.clone();
        m.blocks = keep.iter().map(|&i| self.blocks[i].clone()).collect();
        m.config.num_hidden_layers = m.blocks.len();
        m
    }

    /// Runs `ids` (`[b, s]`, u32) after what `cache` holds. Returns logits `[b, s, vocab]` (All) or
    /// `[b, vocab]` (Last) in the model dtype.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache, logits: Logits) -> Result<Tensor> {
        self.forward_traced(ids, cache, logits, None)
    }

    pub fn forward_traced(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        logits: Logits,
        mut trace: Option<&mut Vec<BlockTrace>>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let offset = cache.len;
        let max_len = self.config.max_position_embeddings;
        if offset + s > max_len {
            return Err(candle_core::Error::Msg(format!(
                "context of {} tokens exceeds max_position_embeddings {max_len}",
                offset + s
            ))
            .into());
        }
        let mask = self.mask(s, offset)?;
        let cos = self.rotary.cos.narrow(0, offset, s)?;
        let sin = self.rotary.sin.narrow(0, offset, s)?;
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, ()))?;
        for (i, block) in self.blocks.iter().enumerate() {
            if !self.runs(block) {
                if let Some(t) = trace.as_deref_mut() {
                    t.push(BlockTrace { layer: i, source: block.source, relative_delta: 0.0, identical: true, skipped: true });
                }
                continue;
            }
            let input = x.clone();
            x = block.forward(&x, &cos, &sin, mask.as_ref(), cache, i, max_len)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(trace_block(i, block.source, &input, &x)?);
            }
        }
        cache.len = offset + s;
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.narrow(1, s - 1, 1)?,
        };
        let x = rms_norm(&x, &self.norm, self.config.rms_norm_eps as f32)?;
        let out = self.lm_head.forward(&x)?;
        Ok(match logits {
            Logits::All => out,
            Logits::Last => out.squeeze(1)?,
        })
    }

    /// Additive attention mask `[s, offset + s]`, or None when every key is visible.
    /// Hugging Face semantics: query at position p sees key j iff j ≤ p and p − j < sliding_window.
    fn mask(&self, s: usize, offset: usize) -> Result<Option<Tensor>> {
        let total = offset + s;
        let window = self.config.sliding_window;
        let windowed = window.is_some_and(|w| total > w);
        if s == 1 && !windowed {
            return Ok(None);
        }
        let mut m = Vec::with_capacity(s * total);
        for i in 0..s {
            let p = offset + i;
            for j in 0..total {
                let visible = j <= p && window.is_none_or(|w| p - j < w);
                m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        Ok(Some(Tensor::from_vec(m, (s, total), &self.device)?.to_dtype(self.dtype)?))
    }
}

/// RMSNorm as transformers computes it: normalised in f32, rounded to the model dtype, then scaled by
/// the weight in that dtype (the fused kernel's single rounding would differ in bf16).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        return candle_nn::ops::rms_norm(x, weight, eps);
    }
    let ones = Tensor::ones(weight.dims(), DType::F32, weight.device())?;
    candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &ones, eps)?.to_dtype(x.dtype())?.broadcast_mul(weight)
}

/// Softmax over the last dim computed in f32, as transformers' eager attention does.
fn softmax_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        return crate::cpu_kernels::softmax_last_dim(x);
    }
    crate::cpu_kernels::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// SiLU computed in f32 and rounded once (torch's opmath), for half dtypes.
fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        return x.silu();
    }
    x.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype())
}

fn trace_block(layer: usize, source: usize, input: &Tensor, output: &Tensor) -> Result<BlockTrace> {
    let a = input.to_dtype(DType::F32)?;
    let delta = (output.to_dtype(DType::F32)? - &a)?;
    let dn = delta.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let an = a.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let identical = output.eq(input)?.min_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? == 1;
    let relative_delta = if an > 0.0 { (dn / an).sqrt() } else { dn.sqrt() };
    Ok(BlockTrace { layer, source, relative_delta, identical, skipped: false })
}

/// Value equality of two tensors: −0.0 == +0.0 (mergekit's zero scaling writes −0.0 where an
/// in-memory copy may hold +0.0); different shapes or dtypes are simply unequal.
pub fn values_equal(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(false);
    }
    Ok(a.eq(b)?.min_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? == 1)
}

impl Block {
    /// Replaces the (verified zero) o_proj and down_proj by zero views, freeing their storage.
    fn release_zero_projections(&mut self) -> Result<()> {
        self.self_attn.o_proj.weight = zero_view(&self.self_attn.o_proj.weight)?;
        self.mlp.down_proj.weight = zero_view(&self.mlp.down_proj.weight)?;
        Ok(())
    }

    /// Every weight of the block in `LAYER_TENSORS` order (copies return their source's shared tensors).
    pub fn tensors(&self) -> [&Tensor; 9] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &self.input_layernorm,
            &a.q_proj.weight,
            &a.k_proj.weight,
            &a.v_proj.weight,
            &a.o_proj.weight,
            &self.post_attention_layernorm,
            &m.gate_proj.weight,
            &m.up_proj.weight,
            &m.down_proj.weight,
        ]
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Cache,
        layer: usize,
        max_len: usize,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward(&h, cos, sin, mask, cache, layer, max_len)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        Ok((&x + self.mlp.forward(&h)?)?)
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Cache,
        layer: usize,
        max_len: usize,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = if is_single_row(x) {
            // Decode: one GEMV over the stacked weight (one fork/join instead of three).
            let qkv = self.qkv_proj.forward(x)?;
            (qkv.narrow(2, 0, nh * d)?, qkv.narrow(2, nh * d, nkv * d)?, qkv.narrow(2, (nh + nkv) * d, nkv * d)?)
        } else {
            (self.q_proj.forward(x)?, self.k_proj.forward(x)?, self.v_proj.forward(x)?)
        };
        let q = q.reshape((b, s, nh, d))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, s, nkv, d))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, s, nkv, d))?.transpose(1, 2)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = cache.append(layer, &k, &v, max_len)?;
        let total = k.dim(2)?;
        if s == 1 && x.device().is_cpu() {
            // One query: a fused kernel reading the cache in place (scores, softmax and the weighted
            // sum in f32) instead of four small ops — in a half dtype candle's matmul would also
            // widen the whole KV buffer to f32 on every call. Half dtypes round where transformers'
            // eager attention rounds (after q·kᵀ, the scaling and the softmax).
            // (In f32 there is nothing to round: the call is plain `decode_attention`.)
            let scale = 1.0 / (d as f64).sqrt();
            let y = crate::kernels::decode_attention_eager_rounding(&q, &k, &v, total, self.sliding_window, scale)?;
            let y = y.transpose(1, 2)?.reshape((b, s, nh * d))?;
            return Ok(self.o_proj.forward(&y)?);
        }
        // GQA without repeating K/V: the n_rep query heads of one KV head become extra rows of
        // one matmul against that head's keys ([b, n_kv, n_rep·s, d] · [b, n_kv, d, total]).
        let n_rep = nh / nkv;
        let q = q.reshape((b, nkv, n_rep * s, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.reshape((b, nh, s, total))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_f32(&scores)?.reshape((b, nkv, n_rep * s, total))?;
        let y = probs.matmul(&v)?.reshape((b, nh, s, d))?.transpose(1, 2)?.reshape((b, s, nh * d))?;
        Ok(self.o_proj.forward(&y)?)
    }
}
