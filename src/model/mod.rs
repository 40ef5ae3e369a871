//! The decoder: a Mistral/Llama forward pass over an (expanded) layer stack whose copied layers share
//! their source's weights, reading and writing a KV cache in place. This is the reference path: every
//! prompt runs here, and it is what the fused decode step (`crate::step`) is checked against.

mod batch;
mod cache;
mod load;
mod storage;
mod trace;

use candle_core::{DType, Device, Module, Tensor};

pub use cache::{Cache, LayerKv, Slot};
pub use load::WeightSource;
pub use storage::{shares_storage, storage_bytes, values_equal};
pub use trace::{BlockTrace, OpTrace};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::quant::QMatrix;

/// A bias-free projection `y = x Wᵀ` whose weight `[out, in]` is dense (the model's dtype) or
/// quantized (`--quant`).
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    Quantized(QMatrix),
}

impl Linear {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Linear::Dense(w) => w.dims2().unwrap_or((0, 0)),
            Linear::Quantized(q) => q.dims(),
        }
    }

    /// The dense weight, or None for a quantized one.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense(w) => Some(w),
            Linear::Quantized(_) => None,
        }
    }

    /// The dense weight; `what` names the use that needs one in the error for a quantized weight.
    pub fn weight(&self, what: &str) -> Result<&Tensor> {
        match self {
            Linear::Dense(w) => Ok(w),
            Linear::Quantized(q) => Err(Error::flag(
                "--quant",
                format!("{what} needs dense weights, and this model's are {}; load it without --quant (a GGUF: a float one)", q.quant_type().name()),
            )),
        }
    }

    pub fn quantized(&self) -> Option<&QMatrix> {
        match self {
            Linear::Dense(_) => None,
            Linear::Quantized(q) => Some(q),
        }
    }

    /// `x` `[m, in]` times the weight's transpose where each row's outputs are the bits that row gets
    /// alone through [`Module::forward`] (the decode rows of several sequences): on the CPU one pass
    /// over the weights for every row; elsewhere one product per row.
    pub fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Quantized(q) => q.forward_rows(x),
            Linear::Dense(w) => match crate::kernels::gemv_batch(x, w) {
                Some(y) => y,
                None => Tensor::cat(&(0..x.dim(0)?).map(|i| self.forward(&x.narrow(0, i, 1)?)).collect::<candle_core::Result<Vec<_>>>()?, 0),
            },
        }
    }

    /// Rows `start..start + len` of the weight, sharing its storage (q, k and v of the stacked qkv).
    pub fn rows(&self, start: usize, len: usize) -> Result<Linear> {
        Ok(match self {
            Linear::Dense(w) => Linear::Dense(w.narrow(0, start, len)?),
            Linear::Quantized(q) => Linear::Quantized(q.rows(start, len)?),
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let weight = match self {
            Linear::Dense(w) => w,
            Linear::Quantized(q) => return q.forward(x),
        };
        let (out, inp) = weight.dims2()?;
        let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, inp))?;
        // On the CPU, our GEMV (decode's single row) and blocked GEMM (prompts): threaded, f32
        // accumulation, one rounding per output, and no whole-weight widening in bf16 (candle's
        // matmul widens a bf16 operand's whole storage — for a view, the whole stack — per call).
        let y = match crate::kernels::gemv(&x2, weight).or_else(|| crate::kernels::gemm(&x2, weight)) {
            Some(y) => y?,
            None => x2.matmul(&weight.t()?)?,
        };
        let mut shape = lead;
        shape.push(out);
        y.reshape(shape)
    }
}

/// One weight of a block, as [`Block::tensors`] lists them: a dense tensor or a quantized matrix.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    Dense(&'a Tensor),
    Quantized(&'a QMatrix),
}

impl<'a> WeightRef<'a> {
    pub fn of(l: &'a Linear) -> WeightRef<'a> {
        match l {
            Linear::Dense(w) => WeightRef::Dense(w),
            Linear::Quantized(q) => WeightRef::Quantized(q),
        }
    }

    pub fn dense(self) -> Option<&'a Tensor> {
        match self {
            WeightRef::Dense(t) => Some(t),
            WeightRef::Quantized(_) => None,
        }
    }

    pub fn dims(self) -> Vec<usize> {
        match self {
            WeightRef::Dense(t) => t.dims().to_vec(),
            WeightRef::Quantized(q) => vec![q.dims().0, q.dims().1],
        }
    }

    pub fn elem_count(self) -> usize {
        self.dims().iter().product()
    }

    /// Bytes this weight is read as (a quantized matrix's blocks, a view's rows).
    pub fn bytes(self) -> usize {
        match self {
            WeightRef::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            WeightRef::Quantized(q) => q.bytes(),
        }
    }

    /// Whether two weights hold the same values (a dense and a quantized one never do). Dense
    /// tensors first compare their first rows: a distinct trained weight differs there already.
    pub fn values_equal(self, other: WeightRef) -> Result<bool> {
        match (self, other) {
            (WeightRef::Dense(a), WeightRef::Dense(b)) => {
                let first = |t: &Tensor| if t.rank() == 2 && t.dim(0).is_ok_and(|r| r > 0) { t.narrow(0, 0, 1) } else { Ok(t.clone()) };
                Ok(a.dims() == b.dims() && values_equal(&first(a)?, &first(b)?)? && values_equal(a, b)?)
            }
            (WeightRef::Quantized(a), WeightRef::Quantized(b)) => a.same_values(b),
            _ => Ok(false),
        }
    }

    /// The values as a tensor: the dense one, or the quantized one dequantized (f32, on the CPU).
    pub fn values(self) -> Result<Tensor> {
        match self {
            WeightRef::Dense(t) => Ok(t.clone()),
            WeightRef::Quantized(q) => q.dequantize(),
        }
    }
}

/// Bytes of distinct storage behind `weights`, dense and quantized (views and copies count once).
pub fn weights_bytes<'a>(weights: impl IntoIterator<Item = WeightRef<'a>>) -> usize {
    let (mut dense, mut quant) = (Vec::new(), Vec::new());
    for w in weights {
        match w {
            WeightRef::Dense(t) => dense.push(t),
            WeightRef::Quantized(q) => quant.push(q),
        }
    }
    storage_bytes(dense) + crate::quant::distinct_bytes(quant)
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
        let (gate, up) = if is_single_row(x) || self.gate_up_proj.quantized().is_some() {
            // Decode: one GEMV over the stacked weight (one fork/join instead of two). Quantized
            // weights always take the stacked product (their gate and up views would each run it).
            let gate_up = self.gate_up_proj.forward(x)?;
            let (last, i) = (gate_up.rank() - 1, self.up_proj.dims().0);
            (gate_up.narrow(last, 0, i)?, gate_up.narrow(last, i, i)?)
        } else {
            // Prompts on the CPU: both projections, SiLU and the product in one pass over the stack.
            let (lead, hidden) = x.dims().split_at(x.rank() - 1);
            let rows = lead.iter().product::<usize>();
            let x2 = x.reshape((rows, hidden[0]))?;
            let swiglu = self.gate_up_proj.dense().and_then(|w| crate::kernels::swiglu(&x2, w));
            if let Some(h) = swiglu {
                return self.down_proj.forward(&h?.reshape([lead, &[self.up_proj.dims().0]].concat())?);
            }
            // Elsewhere two matmuls measured faster than one over the stacked weight (contiguous outputs).
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

/// What every block of one forward call needs besides its input: the rotary rows of this call's
/// positions, the attention mask, and the cache the blocks write their keys and values into.
struct StepCtx<'c> {
    cos: Tensor, // [s, head_dim/2]
    sin: Tensor, // [s, head_dim/2]
    /// Additive mask `[s, offset + s]` for the composed (GPU) attention; None when every key is
    /// visible or a CPU kernel attends.
    mask: Option<Tensor>,
    /// One query on the CPU: the fused decode-attention kernel instead of the composed ops.
    fused_attention: bool,
    unit_norm: &'c Tensor,
    cache: &'c mut Cache,
    /// Where the last position's intermediate values go, when a self-check asks for them.
    ops: Option<&'c mut OpTrace>,
}

/// Which positions' logits `forward` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
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
        let mut inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
        if let Some(s) = &cfg.rope_scaling {
            s.apply(&mut inv_freq);
        }
        let n = cfg.max_position_embeddings;
        let mut angles = Vec::with_capacity(n * d / 2);
        for p in 0..n {
            angles.extend(inv_freq.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (n, d / 2), &Device::Cpu)?;
        Ok(Rotary { cos: angles.cos()?.to_dtype(dtype)?.to_device(device)?, sin: angles.sin()?.to_dtype(dtype)?.to_device(device)? })
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub embed_tokens: Tensor, // [vocab, hidden]
    pub blocks: Vec<Block>,
    pub norm: Tensor,    // [hidden]
    pub lm_head: Linear, // [vocab, hidden], may share embed_tokens' storage
    rotary: Rotary,
    /// f32 ones `[hidden]`: the unit weight of the half-dtype RMSNorm's f32 step.
    unit_norm: Tensor,
    pub dtype: DType,
    pub device: Device,
    /// Skip blocks whose projections were verified to be zero (`--skip-transparent`); their zero
    /// projections were released, so this cannot be turned off again.
    skip_transparent: bool,
    /// Bytes of distinct weight storage held (copies sharing a source count once).
    pub weight_bytes: usize,
    /// `--quant`'s type, when some projection holds it (or its fallback).
    quant: Option<crate::quant::QuantType>,
}

impl Model {
    /// Every weight tensor the model holds (views of stacked weights included; see `storage_bytes`).
    pub fn weights(&self) -> impl Iterator<Item = WeightRef<'_>> {
        let head = [WeightRef::Dense(&self.embed_tokens), WeightRef::Dense(&self.norm), WeightRef::of(&self.lm_head)];
        head.into_iter().chain(self.blocks.iter().flat_map(|b| b.tensors()))
    }

    /// The type `--quant` asked for, when at least one projection holds quantized blocks (some may
    /// hold llama.cpp's fallback type, or stay dense: [`Model::projection_types`] counts them).
    pub fn quant_type(&self) -> Option<crate::quant::QuantType> {
        self.quant
    }

    /// Every projection the blocks hold (q/k/v and gate/up as their stacks), then the lm_head.
    pub fn projections(&self) -> impl Iterator<Item = &Linear> {
        self.blocks.iter().flat_map(Block::projections).chain([&self.lm_head])
    }

    /// How many projections (the lm_head included) each weight type holds: a quantized type's name,
    /// or `dense`, sorted by name.
    pub fn projection_types(&self) -> Vec<(&'static str, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        for l in self.projections() {
            *counts.entry(l.quantized().map_or("dense", |q| q.quant_type().name())).or_insert(0) += 1;
        }
        counts.into_iter().collect()
    }

    /// Whether a prompt position's values (its keys, values and logits) are the same bits in any chunk
    /// of at least two positions, wherever the chunk starts: on the CPU with dense f32 or bf16 weights,
    /// where the GEMM sums each output over its own depth in a fixed order whatever the rows beside it
    /// (`kernels::cpu::gemm`) and prompt attention each query over its own visible keys. Not with
    /// quantized weights (a product of 16 rows or more takes the VNNI lane tiles, fewer the row tiles:
    /// their sums round differently), nor f16 (candle's matmul), nor on a GPU (cuBLAS chooses its
    /// algorithm by shape). A lone position takes the decode path, which rounds differently anywhere.
    pub fn prompt_rows_invariant(&self) -> bool {
        self.device.is_cpu()
            && matches!(self.dtype, DType::F32 | DType::BF16)
            && self.running_projections().all(|l| l.dense().is_some_and(|w| w.dtype() == self.dtype && w.is_contiguous()))
    }

    /// The projections `forward` multiplies by: those of the blocks it runs, then the lm_head.
    fn running_projections(&self) -> impl Iterator<Item = &Linear> {
        self.blocks.iter().filter(|b| self.runs(b)).flat_map(Block::projections).chain([&self.lm_head])
    }

    /// Skips the blocks verified transparent at load time from now on, and releases their zero
    /// projections (a stride-0 view of one zero stays, so `tensors()` still reads as zeros).
    pub fn skip_transparent(&mut self) -> Result<()> {
        for b in self.blocks.iter_mut().filter(|b| b.transparent) {
            b.release_zero_projections()?;
        }
        self.skip_transparent = true;
        self.weight_bytes = weights_bytes(self.weights());
        Ok(())
    }

    /// The rotary tables `[max_position, head_dim/2]` (cos, sin) in the model dtype.
    pub fn rotary_tables(&self) -> (&Tensor, &Tensor) {
        (&self.rotary.cos, &self.rotary.sin)
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
        self.forward_inner(ids, cache, logits, None, None)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        logits: Logits,
        mut trace: Option<&mut Vec<BlockTrace>>,
        ops: Option<&mut OpTrace>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if b != 1 {
            return Err(Error::flag("--ids", format!("one sequence at a time (got a batch of {b})")));
        }
        cache.check_room(s)?;
        let offset = cache.len();
        // One query on the CPU goes to the fused attention kernel, which applies the window itself.
        let fused_attention = s == 1 && self.device.is_cpu();
        let mut ctx = StepCtx {
            cos: self.rotary.cos.narrow(0, offset, s)?,
            sin: self.rotary.sin.narrow(0, offset, s)?,
            // On the CPU the attention kernels apply the causal and window masks themselves.
            mask: if self.device.is_cpu() { None } else { self.mask(s, offset)? },
            fused_attention,
            unit_norm: &self.unit_norm,
            cache,
            ops,
        };
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, ()))?;
        for (i, block) in self.blocks.iter().enumerate() {
            if !self.runs(block) {
                if let Some(t) = trace.as_deref_mut() {
                    t.push(BlockTrace { layer: i, source: block.source, relative_delta: 0.0, identical: true, skipped: true });
                }
                continue;
            }
            let input = x.clone();
            x = block.forward(&x, &mut ctx, i)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(trace::trace_block(i, block.source, &input, &x)?);
            }
        }
        ctx.cache.advance(s);
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.narrow(1, s - 1, 1)?,
        };
        let x = rms_norm(&x, &self.norm, &self.unit_norm, self.config.rms_norm_eps as f32)?;
        ctx.record(None, "h_final", &x)?;
        let out = self.lm_head.forward(&x)?;
        ctx.record(None, "logits", &out)?;
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
/// `ones` is the f32 unit weight `[hidden]` that the normalisation step takes (made once per model).
fn rms_norm(x: &Tensor, weight: &Tensor, ones: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    // The CPU kernel rounds at the same two places in one pass.
    if let Some(y) = crate::kernels::rms_norm(x, weight, eps) {
        return y;
    }
    if x.dtype() == DType::F32 {
        return candle_nn::ops::rms_norm(x, weight, eps);
    }
    candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, ones, eps)?.to_dtype(x.dtype())?.broadcast_mul(weight)
}

/// `x + delta`, rounded once to the dtype (the CPU's kernel, else candle's add).
fn residual_add(x: &Tensor, delta: &Tensor) -> candle_core::Result<Tensor> {
    match crate::kernels::add(x, delta) {
        Some(y) => y,
        None => x + delta,
    }
}

/// Softmax over the last dim computed in f32, as transformers' eager attention does.
fn softmax_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        return crate::kernels::softmax_last_dim(x);
    }
    crate::kernels::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// SiLU computed in f32 and rounded once (torch's opmath), for half dtypes.
fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        return x.silu();
    }
    x.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype())
}

impl Block {
    /// Its four projections (q/k/v and gate/up as their stacks).
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.self_attn.qkv_proj, &self.self_attn.o_proj, &self.mlp.gate_up_proj, &self.mlp.down_proj]
    }

    /// Every weight of the block in `LAYER_TENSORS` order (copies return their source's shared tensors).
    pub fn tensors(&self) -> [WeightRef<'_>; 9] {
        let (a, m) = (&self.self_attn, &self.mlp);
        let w = WeightRef::of;
        [
            WeightRef::Dense(&self.input_layernorm),
            w(&a.q_proj),
            w(&a.k_proj),
            w(&a.v_proj),
            w(&a.o_proj),
            WeightRef::Dense(&self.post_attention_layernorm),
            w(&m.gate_proj),
            w(&m.up_proj),
            w(&m.down_proj),
        ]
    }

    fn forward(&self, x: &Tensor, ctx: &mut StepCtx, layer: usize) -> Result<Tensor> {
        let at = Some(layer);
        ctx.record(at, "x_in", x)?;
        let h = rms_norm(x, &self.input_layernorm, ctx.unit_norm, self.eps)?;
        ctx.record(at, "h_in", &h)?;
        let x = residual_add(x, &self.self_attn.forward(&h, ctx, layer)?)?;
        ctx.record(at, "x_mid", &x)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, ctx.unit_norm, self.eps)?;
        ctx.record(at, "h_post", &h)?;
        let down = self.mlp.forward_traced(&h, ctx, layer)?;
        Ok(residual_add(&x, &down)?)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, ctx: &mut StepCtx, layer: usize) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // One product with the stacked weight: one fork/join (and, in a half dtype, one widening of x)
        // instead of three; each output is the same dot product as with q_proj, k_proj and v_proj.
        let qkv = self.qkv_proj.forward(x)?;
        ctx.record(Some(layer), "qkv", &qkv)?;
        let (q, k, v) = match crate::kernels::rope_heads(&qkv, &ctx.cos, &ctx.sin, d, nh + nkv) {
            // The CPU splits and rotates the heads in one pass (as candle's rope rounds).
            Some(heads) => {
                let heads = heads?;
                (heads.narrow(1, 0, nh)?, heads.narrow(1, nh, nkv)?, heads.narrow(1, nh + nkv, nkv)?)
            }
            None => {
                let heads = |at: usize, n: usize| qkv.narrow(2, at * d, n * d)?.reshape((b, s, n, d))?.transpose(1, 2);
                let (q, k) = (heads(0, nh)?.contiguous()?, heads(nh, nkv)?.contiguous()?);
                let q = candle_nn::rotary_emb::rope(&q, &ctx.cos, &ctx.sin)?;
                (q, candle_nn::rotary_emb::rope(&k, &ctx.cos, &ctx.sin)?, heads(nh + nkv, nkv)?)
            }
        };
        ctx.record_heads(layer, "qkv_rot", &[&q, &k, &v])?;
        let (k, v) = ctx.cache.append(layer, &k, &v)?;
        let total = k.dim(2)?;
        if ctx.fused_attention {
            // One query: a fused kernel reading the cache in place (scores, softmax and the weighted
            // sum in f32) instead of four small ops — in a half dtype candle's matmul would also
            // widen the whole KV buffer to f32 on every call. Half dtypes round where transformers'
            // eager attention rounds (after q·kᵀ, the scaling and the softmax).
            // (In f32 there is nothing to round: the call is plain `decode_attention`.)
            let scale = 1.0 / (d as f64).sqrt();
            let y = crate::kernels::decode_attention_eager_rounding(&q, &k, &v, total, self.sliding_window, scale)?;
            let y = y.transpose(1, 2)?.reshape((b, s, nh * d))?;
            return self.project(&y, ctx, layer);
        }
        if q.device().is_cpu() {
            // Prompts on the CPU: blocked attention that applies the masks itself and materialises
            // one block of scores at a time; its output is already [b, s, heads, d].
            let y = crate::kernels::prompt_attention(&q, &k, &v, self.sliding_window, 1.0 / (d as f64).sqrt())?;
            return Ok(self.o_proj.forward(&y.reshape((b, s, nh * d))?)?);
        }
        let y = self.attend_composed(&q, &k, &v, ctx.mask.as_ref())?;
        self.project(&y, ctx, layer)
    }

    /// Attention by candle's composed ops (devices without our kernels): `q` `[b, n_heads, s, d]`
    /// against the cached `k`, `v` `[b, n_kv, total, d]` under the additive `mask`; `[b, s, n_heads·d]`.
    fn attend_composed(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (b, _, s, _) = q.dims4()?;
        let total = k.dim(2)?;
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
        Ok(probs.matmul(v)?.reshape((b, nh, s, d))?.transpose(1, 2)?.reshape((b, s, nh * d))?)
    }

    /// The output projection of the attention output `y` (`[b, s, n_heads·head_dim]`).
    fn project(&self, y: &Tensor, ctx: &mut StepCtx, layer: usize) -> Result<Tensor> {
        ctx.record(Some(layer), "y", y)?;
        let o = self.o_proj.forward(y)?;
        ctx.record(Some(layer), "o", &o)?;
        Ok(o)
    }
}
