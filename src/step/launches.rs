//! The step's ops resolved into launches of the CUDA kernels, every address and size fixed once per
//! model load, for both executors of `kernels/cuda`: the device (`cuda`) and, in the tests, the CPU
//! emulator of the same sources (`emulated`).

use candle_core::Tensor;

use super::plan::{Buf, Buffers, Kind, Plan, Weight};
use super::{weight, Dims};
use crate::error::{Error, Result};
use crate::kernels::launch::{self, AttnLaunch, DevPtr, Launch};
use crate::model::{Cache, Model};

/// The addresses of what the step owns: its buffers, the split-attention scratch, the state
/// `[token, pos, next, 0]` and the model's rotary tables.
pub(super) struct Addresses {
    pub bufs: Buffers<DevPtr>,
    pub partial: DevPtr,
    pub state: DevPtr,
    pub cos: DevPtr,
    pub sin: DevPtr,
}

/// Every op of `plan` as its launch, and the cache tensors the launches address (to keep alive).
/// `ptr` is the executor's address of a contiguous tensor.
pub(super) fn resolve(
    plan: &Plan,
    model: &Model,
    cache: &Cache,
    dims: &Dims,
    a: &Addresses,
    ptr: &dyn Fn(&Tensor) -> Result<DevPtr>,
) -> Result<(Vec<Launch>, Vec<Tensor>)> {
    let mut kept = Vec::new();
    let launches = plan.ops.iter().map(|op| one(op.kind, plan.splits, model, cache, dims, a, ptr, &mut kept)).collect::<Result<_>>()?;
    Ok((launches, kept))
}

#[allow(clippy::too_many_arguments)] // one op's context: what it reads, and where
fn one(
    kind: Kind,
    splits: usize,
    model: &Model,
    cache: &Cache,
    d: &Dims,
    a: &Addresses,
    ptr: &dyn Fn(&Tensor) -> Result<DevPtr>,
    kept: &mut Vec<Tensor>,
) -> Result<Launch> {
    let w = |w: Weight| ptr(weight(model, w)?);
    let buf = |b: Buf| *a.bufs.get(b);
    let (x, h) = (buf(Buf::X), buf(Buf::H));
    Ok(match kind {
        Kind::EmbedNorm { norm } => launch::residual_norm(x, 0, w(Weight::Embed)?, a.state, w(norm)?, h, d.hidden, d.eps)?,
        Kind::AddNorm { norm } => launch::residual_norm(x, buf(Buf::D), 0, a.state, w(norm)?, h, d.hidden, d.eps)?,
        Kind::Gemv { w: wt, src, dst } => {
            let (rows, cols) = weight(model, wt)?.dims2()?;
            launch::gemv(w(wt)?, buf(src), buf(dst), rows, cols)?
        }
        Kind::GemvSiluMul { w: wt } => launch::gemv_silu_mul(w(wt)?, h, buf(Buf::Act), d.intermediate, d.hidden)?,
        Kind::RopeKv { block } | Kind::Attention { block } => {
            let Some(kv) = cache.layer(block) else { return Err(Error::internal(format!("decode step: no KV cache for block {block}"))) };
            let (kp, vp) = (ptr(&kv.k)?, ptr(&kv.v)?);
            kept.extend([kv.k.clone(), kv.v.clone()]);
            match kind {
                Kind::RopeKv { .. } => launch::rope_kv(buf(Buf::Qkv), a.cos, a.sin, kp, vp, a.state, &d.rope())?,
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
                    dims: d.attention(1),
                })?,
            }
        }
        Kind::Argmax => launch::argmax(buf(Buf::Logits), d.vocab, a.state)?,
    })
}
