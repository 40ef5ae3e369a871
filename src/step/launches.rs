//! The step's ops resolved into launches of the CUDA kernels, every address and size fixed once per
//! model load, for both executors of `kernels/cuda`: the device (`cuda`) and, in the tests, the CPU
//! emulator of the same sources (`emulated`).

use candle_core::Tensor;

use super::plan::{Buf, Buffers, Kind, Plan, Weight};
use super::{projection, weight, Dims};
use crate::error::{Error, Result};
use crate::kernels::launch::{self, AttnLaunch, DevPtr, Launch};
use crate::model::{Cache, Model};
use crate::quant::QMatrix;

/// The addresses of what the step owns: its buffers, the split-attention scratch, the state
/// (`[token, pos, next, slot]` per row) and the model's rotary tables.
pub(super) struct Addresses {
    pub bufs: Buffers<DevPtr>,
    pub partial: DevPtr,
    pub state: DevPtr,
    pub cos: DevPtr,
    pub sin: DevPtr,
}

/// The launches of one op: one, but for a quantized weight whose rows hold several types (one per run
/// of a type, each writing its columns of the output).
pub(super) type OpLaunches = Vec<Launch>;

/// Every op of `plan` as its launches, for each batch size from 1 to `dims.batch` (index n - 1: the
/// launches of n rows), and the cache tensors the launches address (to keep alive). `cache` is the
/// step's cache, or slot 0 of its pool (whose address is the pool's). `ptr` is the executor's
/// address of a contiguous tensor; a quantized weight's blocks are addressed where they lie (on the
/// device for a model on CUDA, on the host for the emulator's).
pub(super) fn resolve(
    plan: &Plan,
    model: &Model,
    cache: &Cache,
    dims: &Dims,
    a: &Addresses,
    ptr: &dyn Fn(&Tensor) -> Result<DevPtr>,
) -> Result<(Vec<Vec<OpLaunches>>, Vec<Tensor>)> {
    let mut kept = Vec::new();
    let mut by_batch = Vec::with_capacity(dims.batch);
    for n in 1..=dims.batch {
        let at = Context { splits: plan.splits, model, cache, d: dims, a, ptr, n };
        by_batch.push(plan.ops.iter().map(|op| at.one(op.kind, &mut kept)).collect::<Result<_>>()?);
    }
    Ok((by_batch, kept))
}

/// What every op's launch is resolved against, for a batch of `n` rows.
struct Context<'a> {
    splits: usize,
    model: &'a Model,
    cache: &'a Cache,
    d: &'a Dims,
    a: &'a Addresses,
    ptr: &'a dyn Fn(&Tensor) -> Result<DevPtr>,
    n: usize,
}

impl Context<'_> {
    fn one(&self, kind: Kind, kept: &mut Vec<Tensor>) -> Result<OpLaunches> {
        let Context { splits, model, cache, d, a, ptr, n } = *self;
        let w = |w: Weight| ptr(weight(model, w)?);
        let buf = |b: Buf| *a.bufs.get(b);
        let (x, h) = (buf(Buf::X), buf(Buf::H));
        let quantized = match kind {
            Kind::Gemv { w, .. } | Kind::GemvSiluMul { w } => projection(model, w).and_then(|l| l.quantized()),
            _ => None,
        };
        if let Some(q) = quantized {
            return match kind {
                Kind::Gemv { src, dst, .. } => self.gemv_quant(q, buf(src), buf(dst)),
                _ => self.silu_mul_quant(q, h, buf(Buf::Act)),
            };
        }
        Ok(vec![match kind {
            Kind::EmbedNorm { norm } => launch::residual_norm(x, 0, w(Weight::Embed)?, a.state, w(norm)?, h, d.hidden, d.eps, n)?,
            Kind::AddNorm { norm } => launch::residual_norm(x, buf(Buf::D), 0, a.state, w(norm)?, h, d.hidden, d.eps, n)?,
            Kind::Gemv { w: wt, src, dst } => {
                let (rows, cols) = weight(model, wt)?.dims2()?;
                launch::gemv(w(wt)?, buf(src), buf(dst), rows, cols, n)?
            }
            Kind::GemvSiluMul { w: wt } => launch::gemv_silu_mul(w(wt)?, h, buf(Buf::Act), d.intermediate, d.hidden, n)?,
            Kind::RopeKv { block } | Kind::Attention { block } => {
                let Some(kv) = cache.layer(block) else { return Err(Error::internal(format!("decode step: no KV cache for block {block}"))) };
                let (kp, vp) = (ptr(&kv.k)?, ptr(&kv.v)?);
                if n == 1 {
                    kept.extend([kv.k.clone(), kv.v.clone()]);
                }
                match kind {
                    Kind::RopeKv { .. } => launch::rope_kv(buf(Buf::Qkv), a.cos, a.sin, kp, vp, a.state, &d.rope(), n)?,
                    _ => launch::attention(&AttnLaunch {
                        q: buf(Buf::Qkv),
                        k: kp,
                        v: vp,
                        out: buf(Buf::Y),
                        partial: a.partial,
                        state: a.state,
                        kv_len: 0,
                        window: d.window.unwrap_or(0),
                        splits,
                        scale: d.scale,
                        dims: d.attention_batch(n),
                        scratch_batch: d.batch,
                    })?,
                }
            }
            Kind::Argmax => launch::argmax(buf(Buf::Logits), d.vocab, a.state, n)?,
        }])
    }

    /// `dst = src · qᵀ`: a launch per run of one type, each into its columns of `dst`.
    fn gemv_quant(&self, q: &QMatrix, src: DevPtr, dst: DevPtr) -> Result<OpLaunches> {
        let (rows, cols) = q.dims();
        let elem = self.model.dtype.size_in_bytes() as DevPtr;
        let runs = q.block_runs()?;
        Ok(runs
            .iter()
            .map(|r| launch::gemv_quant(r.ty.kernel(), r.addr, src, dst + r.first_row as DevPtr * elem, r.rows, cols, self.n, rows))
            .collect::<candle_core::Result<_>>()?)
    }

    /// `act = silu(h · gateᵀ) · (h · upᵀ)` over a quantized gate/up stack of one type (`resolve`
    /// keeps a model mixing two off the step).
    fn silu_mul_quant(&self, q: &QMatrix, h: DevPtr, act: DevPtr) -> Result<OpLaunches> {
        let d = self.d;
        match q.block_runs()?.as_slice() {
            [r] if r.rows == 2 * d.intermediate && q.dims().1 == d.hidden => {
                Ok(vec![launch::gemv_silu_mul_quant(r.ty.kernel(), r.addr, h, act, d.intermediate, d.hidden, self.n)?])
            }
            runs => Err(Error::internal(format!("decode step: a gate/up stack of {} runs for {} rows of {}", runs.len(), 2 * d.intermediate, d.hidden))),
        }
    }
}

/// Words of state per row (`STATE_WORDS` in kernels/cuda/common.cuh).
pub(super) const STATE_WORDS: usize = 4;

/// The state words of `rows` (`[token, pos, next, slot]` each) for a step of at most `batch` rows.
pub(super) fn state_words(rows: &[super::Row], batch: usize) -> Result<Vec<u32>> {
    if rows.is_empty() || rows.len() > batch {
        return Err(Error::internal(format!("decode step: {} rows for a step of at most {batch}", rows.len())));
    }
    let word = |what: &str, v: usize| u32::try_from(v).map_err(|_| Error::internal(format!("{what} {v} does not fit in u32")));
    let mut out = Vec::with_capacity(STATE_WORDS * rows.len());
    for r in rows {
        out.extend([r.token, word("position", r.pos)?, 0, word("slot", r.slot)?]);
    }
    Ok(out)
}

/// The argmax each of the first `n` rows wrote into `state`.
pub(super) fn next_of(state: &[u32], n: usize) -> Vec<u32> {
    state.chunks(STATE_WORDS).take(n).map(|r| r[2]).collect()
}

/// The fault injection's perturbation of the argmax: each row's next id instead.
pub(super) fn bump_next(state: &mut [u32], n: usize, vocab: usize) {
    for r in state.chunks_mut(STATE_WORDS).take(n) {
        r[2] = (r[2] + 1) % vocab as u32;
    }
}
