//! The fused decode step: one token through the model as a fixed list of our own kernels (`plan`) on
//! buffers allocated once per model load, executed on the CPU (`cpu`) or on CUDA (`cuda`, where it is
//! captured once and replayed as a CUDA graph), and checked against the reference forward pass the
//! first time a process uses it on a device (`check`). Prompts stay on the reference path, which
//! writes the same preallocated KV cache that the step then reads.

#[cfg(test)]
pub(crate) mod batch_check;
pub mod check;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod emulated;
#[cfg(any(feature = "cuda", test))]
mod launches;
pub mod plan;
pub mod roofline;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::model::{Cache, Model};
use cpu::CpuExec;
use plan::{Buf, OpName, Plan, Weight};

/// How decode steps run (`--decode-path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodePath {
    /// The fastest path the device has: graph on CUDA, fused on the CPU, reference on Metal.
    Auto,
    /// The fused step captured once as a CUDA graph and replayed per token (CUDA only).
    Graph,
    /// The fused step, its kernels launched one by one.
    Fused,
    /// The reference forward pass (candle's composed ops).
    Reference,
}

impl DecodePath {
    pub fn parse(s: &str) -> Result<DecodePath> {
        Ok(match s {
            "auto" => DecodePath::Auto,
            "graph" => DecodePath::Graph,
            "fused" => DecodePath::Fused,
            "reference" => DecodePath::Reference,
            _ => return Err(Error::flag("--decode-path", format!("`{s}`: expected auto, graph, fused or reference"))),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DecodePath::Auto => "auto",
            DecodePath::Graph => "graph",
            DecodePath::Fused => "fused",
            DecodePath::Reference => "reference",
        }
    }

    /// The path that runs `model` for this request: `auto` picks; a path the device or the weights
    /// cannot run is an error naming the flag. Metal has no fused kernels (a quantized model runs the
    /// reference path there, on candle's); the CPU's fused step multiplies every quantized type
    /// through `quant::cpu_product`, CUDA's through `kernels/cuda/gemv_quant.cu`.
    pub fn resolve(self, model: &Model) -> Result<DecodePath> {
        self.resolve_on(model, model.device.is_cuda() && cfg!(feature = "cuda"))
    }

    /// [`DecodePath::resolve`], `cuda` saying whether the step's CUDA kernels run the model (on a
    /// GPU, or in the tests on their emulator).
    pub(crate) fn resolve_on(self, model: &Model, cuda: bool) -> Result<DecodePath> {
        let device = &model.device;
        if let Some(q) = model.quant_type() {
            let why = match device {
                _ if cuda => quantized_unsupported(model),
                Device::Cpu => None,
                Device::Metal(_) => Some(format!("the fused step on Metal has no {} kernels", q.name())),
                Device::Cuda(_) => Some(format!("the fused step in this build (no CUDA kernels) has no {} kernels", q.name())),
            };
            if let Some(why) = why {
                return match self {
                    DecodePath::Auto | DecodePath::Reference => Ok(DecodePath::Reference),
                    p => Err(Error::flag(
                        "--decode-path",
                        format!("{}: {why}; a quantized model (--quant, a quantized GGUF) runs the reference path there", p.as_str()),
                    )),
                };
            }
        }
        match (self, device) {
            (DecodePath::Auto, _) if cuda => Ok(DecodePath::Graph),
            (DecodePath::Auto, Device::Cpu) => Ok(DecodePath::Fused),
            (DecodePath::Auto, _) => Ok(DecodePath::Reference),
            (DecodePath::Graph, _) if !cuda => Err(Error::flag("--decode-path", "graph: CUDA graphs need a CUDA device")),
            (DecodePath::Fused, Device::Metal(_)) => Err(Error::flag("--decode-path", "fused: Metal has no fused decode kernels; use reference")),
            (p, _) => Ok(p),
        }
    }
}

/// Why the CUDA step cannot run a quantized model, if it cannot: its SwiGLU kernel reads gate and up
/// as one stack of one type (a file mixing the two types runs the reference path).
fn quantized_unsupported(model: &Model) -> Option<String> {
    model.blocks.iter().enumerate().find_map(|(i, b)| {
        let types = b.mlp.gate_up_proj.quantized()?.types();
        (types.len() > 1).then(|| {
            let names: Vec<&str> = types.iter().map(|(t, _)| t.name()).collect();
            format!("layer {i}'s gate and up projections are of different types ({}), which the fused SwiGLU kernel does not take", names.join(", "))
        })
    })
}

/// Shapes and constants of a model's step.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// Tokens the KV cache holds.
    pub capacity: usize,
    pub eps: f32,
    pub window: Option<usize>,
    pub scale: f32,
    /// Rows of the step's buffers: the most sequences it decodes together (1 but in a batched step).
    pub batch: usize,
}

impl Dims {
    fn new(model: &Model, capacity: usize, batch: usize) -> Dims {
        let c = &model.config;
        Dims {
            hidden: c.hidden_size,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            capacity,
            eps: c.rms_norm_eps as f32,
            window: c.sliding_window,
            scale: (1.0 / (c.head_dim as f64).sqrt()) as f32,
            batch,
        }
    }

    /// Width of the stacked q, k and v of one token.
    pub fn qkv(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// One row's attention over `kv_len` keys.
    pub(crate) fn attention(&self, kv_len: usize) -> crate::kernels::AttnDims {
        crate::kernels::AttnDims { b: 1, ..self.attention_of(kv_len) }
    }

    /// The attention of `b` rows, each row's q in its row of the qkv buffer and its keys in the slot
    /// of the pool its state names (the kernel reads the length from the state).
    #[cfg(any(feature = "cuda", test))]
    pub(crate) fn attention_batch(&self, b: usize) -> crate::kernels::AttnDims {
        crate::kernels::AttnDims { b, ..self.attention_of(1) }
    }

    fn attention_of(&self, kv_len: usize) -> crate::kernels::AttnDims {
        let (nh, nkv, hd, cap) = (self.n_heads, self.n_kv_heads, self.head_dim, self.capacity);
        crate::kernels::AttnDims {
            b: 1,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            kv_start: self.window.map_or(0, |w| kv_len.saturating_sub(w)),
            kv_end: kv_len,
            q_sb: self.qkv(),
            q_sh: hd,
            k_sb: nkv * cap * hd,
            k_sh: cap * hd,
            k_ss: hd,
            v_sb: nkv * cap * hd,
            v_sh: cap * hd,
            v_ss: hd,
        }
    }

    pub(crate) fn rope(&self) -> crate::kernels::cpu::RopeDims {
        crate::kernels::cpu::RopeDims { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim, capacity: self.capacity }
    }
}

/// The attention splits of a step over a cache of `capacity` tokens: `opts.splits`, else 1 on the
/// CPU and on a GPU as many as fill the device (`kernels::launch::attention_splits`).
pub fn splits_for(model: &Model, capacity: usize, opts: &StepOptions) -> usize {
    let by_device = || {
        if model.device.is_cpu() {
            return 1;
        }
        let c = &model.config;
        let blocks = crate::kernels::launch::attention_blocks_per_split(1, c.num_attention_heads, c.num_key_value_heads);
        crate::kernels::launch::attention_splits(capacity, blocks)
    };
    opts.splits.unwrap_or_else(by_device).max(1)
}

/// Whether `model` runs the batched fused step with `opts` (`DecodeStep::batched`): on CUDA (in
/// tests, on the CUDA emulator); elsewhere sequences batch through `Model::decode_rows`.
pub fn batches_on(model: &Model, opts: &StepOptions) -> bool {
    #[cfg(test)]
    if opts.emulate_cuda.is_some() {
        return true;
    }
    let _ = opts; // read only by the tests' emulator
    model.device.is_cuda() && cfg!(feature = "cuda")
}

/// The tensor behind a step weight. A quantized projection is an error here: the executors take a
/// quantized one's blocks through [`projection`].
pub fn weight(model: &Model, w: Weight) -> Result<&Tensor> {
    const USE: &str = "the fused decode step on the CPU";
    Ok(match w {
        Weight::Embed => &model.embed_tokens,
        Weight::FinalNorm => &model.norm,
        Weight::InputNorm(b) => &model.blocks[b].input_layernorm,
        Weight::PostNorm(b) => &model.blocks[b].post_attention_layernorm,
        w => projection(model, w).ok_or_else(|| Error::internal(format!("{w:?} is not a weight of the step")))?.weight(USE)?,
    })
}

/// The projection behind a step weight (None for the embedding and the norms).
pub fn projection(model: &Model, w: Weight) -> Option<&crate::model::Linear> {
    let block = |b: usize| model.blocks.get(b);
    match w {
        Weight::LmHead => Some(&model.lm_head),
        Weight::Qkv(b) => block(b).map(|b| &b.self_attn.qkv_proj),
        Weight::O(b) => block(b).map(|b| &b.self_attn.o_proj),
        Weight::GateUp(b) => block(b).map(|b| &b.mlp.gate_up_proj),
        Weight::Down(b) => block(b).map(|b| &b.mlp.down_proj),
        Weight::Embed | Weight::FinalNorm | Weight::InputNorm(_) | Weight::PostNorm(_) => None,
    }
}

/// A deliberately wrong op (`--inject-fault [LAYER:]OP[:nan]`, for testing the self-check): its output
/// is scaled by −4 after it runs (the argmax picks the next id instead), or with `:nan` one element of
/// it becomes NaN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub layer: Option<usize>,
    pub op: OpName,
    pub nan: bool,
}

impl Fault {
    pub fn parse(s: &str) -> Result<Fault> {
        let bad = || {
            let names: Vec<&str> = OpName::ALL.iter().map(|n| n.as_str()).collect();
            Error::flag("--inject-fault", format!("`{s}`: expected [LAYER:]OP[:nan] with OP one of {}", names.join(", ")))
        };
        let (rest, nan) = match s.strip_suffix(":nan") {
            Some(r) => (r, true),
            None => (s, false),
        };
        let (layer, op) = match rest.split_once(':') {
            Some((l, op)) => (Some(l.parse::<usize>().map_err(|_| bad())?), op),
            None => (None, rest),
        };
        let op = OpName::parse(op).ok_or_else(bad)?;
        if nan && op == OpName::Argmax {
            return Err(Error::flag("--inject-fault", format!("`{s}`: the argmax writes an id, not values a NaN could go into")));
        }
        Ok(Fault { layer, op, nan })
    }
}

/// How a step is built.
#[derive(Debug, Clone, Default)]
pub struct StepOptions {
    /// Attention splits (default: 1 on the CPU, sized by the capacity on a GPU).
    pub splits: Option<usize>,
    pub fault: Option<Fault>,
    /// Run the CUDA executor's launches on the CPU emulator in this order (tests).
    #[cfg(test)]
    pub(crate) emulate_cuda: Option<expanse_cuda_emulator::Schedule>,
}

/// One row of a step's device state: the token a sequence decodes, its position, and the slot of the
/// step's cache pool that holds its keys and values (0 for a step of one cache).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    pub token: u32,
    pub pos: usize,
    pub slot: usize,
}

/// What a decode step hands back.
#[derive(Debug)]
pub enum StepOut {
    /// The greedy choice (argmax taken on the device).
    Token(u32),
    /// The last position's logits `[vocab]` (f32, on the CPU).
    Logits(Tensor),
}

enum Exec {
    F32(CpuExec<f32>),
    Bf16(CpuExec<bf16>),
    F16(CpuExec<f16>),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::CudaExec>),
    /// The CUDA executor's launches on the CPU emulator of the kernel sources (tests).
    #[cfg(test)]
    Emulated(Box<emulated::EmulatedExec>),
}

/// Runs `$body` with `$e` bound to the CPU executor of whatever dtype, or `$cuda` for CUDA.
macro_rules! on_exec {
    ($exec:expr, |$e:ident| $body:expr, |$c:ident| $cuda:expr) => {
        match $exec {
            Exec::F32($e) => $body,
            Exec::Bf16($e) => $body,
            Exec::F16($e) => $body,
            #[cfg(feature = "cuda")]
            Exec::Cuda($c) => $cuda,
            #[cfg(test)]
            Exec::Emulated($c) => $cuda,
        }
    };
}

/// The fused decode step of one model, bound to one KV cache (`new`) or to a pool of them whose
/// sequences it decodes together (`batched`).
pub struct DecodeStep<'m> {
    model: &'m Model,
    plan: Plan,
    dims: Dims,
    exec: Exec,
    path: DecodePath,
    /// Identity of the cache the step was built for (the CUDA executor holds its addresses).
    cache_id: usize,
    /// Identity of the pool a batched step was built for.
    pool: Option<usize>,
    /// Kernel launches of the last token, counted by `dispatch`.
    launches: usize,
    fault: Option<Fault>,
}

/// The executor of the step for the model's device and dtype (in tests, the emulator when asked).
fn executor(model: &Model, cache: &Cache, plan: &Plan, dims: &Dims, opts: &StepOptions) -> Result<Exec> {
    #[cfg(test)]
    if let Some(s) = opts.emulate_cuda {
        return Ok(Exec::Emulated(Box::new(emulated::EmulatedExec::new(model, cache, plan, dims, s)?)));
    }
    let _ = (cache, opts); // read only by the CUDA and emulated executors
    Ok(match (&model.device, model.dtype) {
        (Device::Cpu, DType::F32) => Exec::F32(CpuExec::new(dims, plan.splits)),
        (Device::Cpu, DType::BF16) => Exec::Bf16(CpuExec::new(dims, plan.splits)),
        (Device::Cpu, DType::F16) => Exec::F16(CpuExec::new(dims, plan.splits)),
        #[cfg(feature = "cuda")]
        (Device::Cuda(dev), dt) => Exec::Cuda(Box::new(cuda::CudaExec::new(dev, dt, model, cache, plan, dims)?)),
        (dev, dt) => return Err(Error::flag("--decode-path", format!("the fused step runs on the CPU and CUDA, not {:?} in {dt:?}", dev.location()))),
    })
}

/// An injected fault must name an op of the plan (`--inject-fault`).
fn check_fault(plan: &Plan, opts: &StepOptions) -> Result<()> {
    match &opts.fault {
        Some(f) if !plan.ops.iter().any(|o| o.name == f.op && (f.layer.is_none() || o.layer == f.layer)) => {
            Err(Error::flag("--inject-fault", format!("no op {} in layer {:?} of this step", f.op.as_str(), f.layer)))
        }
        _ => Ok(()),
    }
}

impl<'m> DecodeStep<'m> {
    /// Builds the step of `model` on `path` (fused or graph) for `cache`: buffers are allocated and
    /// every kernel is loaded now, so nothing allocates or loads while tokens run.
    pub fn new(model: &'m Model, cache: &Cache, path: DecodePath, opts: &StepOptions) -> Result<DecodeStep<'m>> {
        if path != DecodePath::Reference {
            path.resolve_on(model, batches_on(model, opts))?;
        }
        let dims = Dims::new(model, cache.capacity(), 1);
        let plan = Plan::new(model, splits_for(model, cache.capacity(), opts));
        let exec = executor(model, cache, &plan, &dims, opts)?;
        check_fault(&plan, opts)?;
        Ok(DecodeStep { model, plan, dims, exec, path, cache_id: cache.id(), pool: None, launches: 0, fault: opts.fault })
    }

    /// Builds the step that decodes up to `pool.len()` sequences together, each in its own slot of
    /// `pool` (`Cache::pool`, every slot in order): one launch per op for the whole batch, each weight
    /// read once for every row, and each row's results the bits it gets alone (the kernels' sums do
    /// not depend on the batch). The batched step runs on CUDA (on the CPU, sequences batch through
    /// `Model::decode_rows`).
    pub fn batched(model: &'m Model, pool: &[&Cache], path: DecodePath, opts: &StepOptions) -> Result<DecodeStep<'m>> {
        let Some(first) = pool.first() else { return Err(Error::internal("batched decode step: an empty pool")) };
        let Some(id) = first.slot().map(|s| s.pool) else { return Err(Error::internal("batched decode step: caches outside a pool")) };
        for (i, c) in pool.iter().enumerate() {
            if c.slot() != Some(crate::model::Slot { pool: id, index: i, of: pool.len() }) || c.capacity() != first.capacity() {
                return Err(Error::internal("batched decode step: the caches are not every slot of one pool, in order"));
            }
        }
        let path = path.resolve_on(model, batches_on(model, opts))?;
        if path == DecodePath::Reference {
            return Err(Error::internal("batched decode step: built for the reference path"));
        }
        let dims = Dims::new(model, first.capacity(), pool.len());
        let plan = Plan::new(model, splits_for(model, first.capacity(), opts));
        let exec = executor(model, first, &plan, &dims, opts)?;
        if matches!(exec, Exec::F32(_) | Exec::Bf16(_) | Exec::F16(_)) {
            return Err(Error::flag("--decode-path", "the batched fused step runs on CUDA; on the CPU, sequences batch through the reference path"));
        }
        check_fault(&plan, opts)?;
        Ok(DecodeStep { model, plan, dims, exec, path, cache_id: first.id(), pool: Some(id), launches: 0, fault: opts.fault })
    }

    /// The most sequences one `decode_batch` takes (1 for a step of one cache).
    pub fn batch(&self) -> usize {
        self.dims.batch
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    pub fn path(&self) -> DecodePath {
        self.path
    }

    /// Kernel launches the last token took (on the graph path: those its capture recorded).
    pub fn launches_per_token(&self) -> usize {
        self.launches
    }

    /// Nodes of the captured CUDA graph (None before capture, or off the graph path).
    pub fn graph_nodes(&self) -> Option<usize> {
        match &self.exec {
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => c.graph_nodes(),
            _ => None,
        }
    }

    /// Runs `token` at the cache's next position and advances the cache by one.
    pub fn decode(&mut self, cache: &mut Cache, token: u32, want_logits: bool) -> Result<StepOut> {
        if cache.id() != self.cache_id {
            return Err(candle_core::Error::Msg("decode step: called with another KV cache than it was built for".into()).into());
        }
        if token as usize >= self.dims.vocab {
            return Err(Error::flag("--ids", format!("token id {token} is out of range for vocab size {}", self.dims.vocab)));
        }
        cache.check_room(1)?;
        let pos = cache.len();
        self.set_state(&[Row { token, pos, slot: 0 }])?;
        self.run_token(cache)?;
        // Read before the cache moves on: a device fault shows at the first read, and a failed step
        // must leave the cache where it was (the caller redoes the token on another path).
        let out = self.output(want_logits, 1)?.remove(0);
        cache.advance(1);
        Ok(out)
    }

    /// Runs `tokens[i]` at the next position of `caches[i]` (slots of the step's pool, at most
    /// `batch()` of them, in any order) and advances each by one: row i of the outputs is that
    /// sequence's, the same bits as decoding it alone.
    pub fn decode_batch(&mut self, caches: &mut [&mut Cache], tokens: &[u32], want_logits: bool) -> Result<Vec<StepOut>> {
        let Some(pool) = self.pool else { return Err(Error::internal("decode_batch: a step of one cache (use decode)")) };
        let n = tokens.len();
        if n == 0 || n > self.dims.batch || caches.len() != n {
            return Err(Error::internal(format!("decode_batch: {n} tokens for {} caches, at most {} rows", caches.len(), self.dims.batch)));
        }
        let mut rows = Vec::with_capacity(n);
        for (c, &token) in caches.iter().zip(tokens) {
            let slot = match c.slot() {
                Some(s) if s.pool == pool => s.index,
                _ => return Err(Error::internal("decode_batch: a cache outside the step's pool")),
            };
            if rows.iter().any(|r: &Row| r.slot == slot) {
                return Err(Error::internal(format!("decode_batch: slot {slot} twice in one batch")));
            }
            if token as usize >= self.dims.vocab {
                return Err(Error::flag("--ids", format!("token id {token} is out of range for vocab size {}", self.dims.vocab)));
            }
            c.check_room(1)?;
            rows.push(Row { token, pos: c.len(), slot });
        }
        self.set_state(&rows)?;
        self.run_token(&*caches[0])?;
        // As in `decode`: the outputs first, then the caches move on.
        let out = self.output(want_logits, n)?;
        for c in caches.iter_mut() {
            c.advance(1);
        }
        Ok(out)
    }

    /// Writes the rows' state (a CPU step has one row).
    fn set_state(&mut self, rows: &[Row]) -> Result<()> {
        on_exec!(
            &mut self.exec,
            |e| {
                let Some(r) = rows.first() else { return Err(Error::internal("decode step: no row to run")) };
                e.token = r.token;
                e.pos = r.pos;
                Ok(())
            },
            |c| c.set_state(rows)
        )
    }

    /// All ops of one token: through the captured graph when there is one, else op by op.
    fn run_token(&mut self, cache: &Cache) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Exec::Cuda(c) = &mut self.exec {
            if self.path == DecodePath::Graph && self.fault.is_none() {
                if c.has_graph() {
                    return c.replay();
                }
                if c.warmed_up() {
                    c.begin_capture()?;
                    let ran = self.run_ops(cache);
                    let Exec::Cuda(c) = &mut self.exec else { unreachable!("checked above") };
                    c.end_capture(ran)?;
                    return c.replay();
                }
            }
        }
        self.run_ops(cache)?;
        #[cfg(feature = "cuda")]
        if let Exec::Cuda(c) = &mut self.exec {
            c.mark_warmed_up();
        }
        Ok(())
    }

    /// Every op in order, each through `dispatch`.
    fn run_ops(&mut self, cache: &Cache) -> Result<()> {
        self.launches = 0;
        for i in 0..self.plan.ops.len() {
            self.dispatch(i, cache)?;
            self.inject_fault(i)?;
        }
        Ok(())
    }

    /// The one function every fused op goes through: it hands the op to the executor of the device
    /// and counts its launches (one, but for a quantized stack of several types: one per type).
    fn dispatch(&mut self, i: usize, cache: &Cache) -> Result<()> {
        let (op, model, dims, splits) = (&self.plan.ops[i], self.model, &self.dims, self.plan.splits);
        self.launches += on_exec!(&mut self.exec, |e| e.run(op, model, cache, dims, splits).map(|()| 1), |c| c.launch(i))?;
        Ok(())
    }

    fn inject_fault(&mut self, i: usize) -> Result<()> {
        let op = self.plan.ops[i];
        let Some(f) = self.fault.filter(|f| f.op == op.name && (f.layer.is_none() || f.layer == op.layer)) else {
            return Ok(());
        };
        match self.plan.output(&op) {
            Some(b) => {
                let mut v = self.read_buf(b)?;
                if f.nan {
                    // One element, in the middle: a check must see NaN wherever it lands.
                    let mid = v.len() / 2;
                    if let Some(x) = v.get_mut(mid) {
                        *x = f32::NAN;
                    }
                } else {
                    v.iter_mut().for_each(|x| *x *= -4.0);
                }
                self.write_buf(b, &v)
            }
            None => on_exec!(
                &mut self.exec,
                |e| {
                    e.next = (e.next + 1) % self.dims.vocab as u32;
                    Ok(())
                },
                |c| c.bump_next(self.dims.vocab)
            ),
        }
    }

    /// The outputs of the first `n` rows.
    fn output(&mut self, want_logits: bool, n: usize) -> Result<Vec<StepOut>> {
        if !want_logits {
            return Ok(self.next_tokens()?.into_iter().take(n).map(StepOut::Token).collect());
        }
        let v = self.read_buf(Buf::Logits)?;
        let vocab = self.dims.vocab;
        (0..n).map(|i| Ok(StepOut::Logits(Tensor::from_slice(&v[i * vocab..(i + 1) * vocab], vocab, &Device::Cpu)?))).collect()
    }

    /// Buffer `b` as f32 on the host.
    pub(crate) fn read_buf(&self, b: Buf) -> Result<Vec<f32>> {
        on_exec!(&self.exec, |e| Ok(e.read_buf(b)), |c| c.read_buf(b))
    }

    /// Sets buffer `b` (rounded to the model dtype).
    pub(crate) fn write_buf(&mut self, b: Buf, values: &[f32]) -> Result<()> {
        on_exec!(
            &mut self.exec,
            |e| {
                e.write_buf(b, values);
                Ok(())
            },
            |c| c.write_buf(b, values)
        )
    }

    /// The argmax the last run wrote (its first row's).
    pub(crate) fn next_token(&self) -> Result<u32> {
        self.next_tokens()?.first().copied().ok_or_else(|| Error::internal("decode step: no row ran"))
    }

    /// The argmax of each row the last run wrote.
    fn next_tokens(&self) -> Result<Vec<u32>> {
        on_exec!(&self.exec, |e| Ok(vec![e.next]), |c| c.next())
    }

    /// Each op kind's time per token (for the roofline beside it): the kind's launches, every layer's,
    /// run back to back between two device synchronizations, `rounds` times, the median kept. Each
    /// layer reads its own weights, so no kind is timed from a cache its last launch warmed; run alone,
    /// a kind pays its ramp-up and tail, which the whole step hides in part (PDL, overlap), so the kinds
    /// sum to a little more than a token. `token` runs at `pos` (< the cache's capacity): rope_kv
    /// rewrites that row of the cache and every buffer is overwritten, so decode again from a reset
    /// or a position at or before `pos` afterwards.
    pub fn op_times(&mut self, cache: &Cache, token: u32, pos: usize, rounds: usize) -> Result<Vec<roofline::OpTime>> {
        if pos >= self.dims.capacity {
            return Err(Error::internal(format!("op_times: position {pos} is past the cache's {} tokens", self.dims.capacity)));
        }
        let device = self.model.device.clone();
        self.set_state(&[Row { token, pos, slot: 0 }])?;
        let launches = self.launches;
        let mut kinds: Vec<OpName> = Vec::new();
        for op in &self.plan.ops {
            if !kinds.contains(&op.name) {
                kinds.push(op.name);
            }
        }
        let mut out = Vec::with_capacity(kinds.len());
        for kind in kinds {
            let ops: Vec<usize> = (0..self.plan.ops.len()).filter(|&i| self.plan.ops[i].name == kind).collect();
            let mut samples = Vec::with_capacity(rounds.max(1));
            // Kernel launches, as `dispatch` counts them (a quantized stack of two types: two per op).
            let counted = self.launches;
            for _ in 0..rounds.max(1) {
                crate::device::synchronize(&device)?;
                let t = std::time::Instant::now();
                for &i in &ops {
                    self.dispatch(i, cache)?;
                }
                crate::device::synchronize(&device)?;
                samples.push(t.elapsed().as_secs_f64());
            }
            samples.sort_by(f64::total_cmp);
            let launches = (self.launches - counted) / rounds.max(1);
            out.push(roofline::OpTime { op: kind.as_str(), launches, seconds: samples[samples.len() / 2] });
        }
        self.launches = launches;
        Ok(out)
    }

    /// Runs op `i` alone at `pos` for `token` (the self-check's op-by-op diagnosis).
    pub(crate) fn run_op(&mut self, cache: &Cache, i: usize, token: u32, pos: usize) -> Result<()> {
        self.set_state(&[Row { token, pos, slot: 0 }])?;
        self.dispatch(i, cache)?;
        self.inject_fault(i)
    }
}
