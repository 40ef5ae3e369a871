//! The decode step on the CPU: every op is a call into `kernels::cpu` (a quantized projection's into
//! `quant::cpu_product`) on buffers allocated once; the KV cache is written in place through candle's
//! in-place op interface, so no unsafe code is needed.

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Storage, Tensor};

use crate::error::Error;

use super::plan::{Buf, Buffers, Kind, Op};
use super::{weight, Dims};
use crate::error::Result;
use crate::kernels::cpu::{
    argmax, attention_combine, attention_into, attention_partial, gemv_rows, residual_rms_norm, rope_qk, silu_mul, write_cache_rows, DotElem, Elem, RopeDims,
};
use crate::model::{Cache, Model};

/// The CPU executor of one model's step, for storage element `T`.
pub(super) struct CpuExec<T> {
    bufs: Buffers<Vec<T>>,
    /// Split-attention partials `[n_heads, splits, head_dim + 2]`.
    partial: Vec<f32>,
    /// The f32 products of a GEMV before rounding.
    acc: Vec<f32>,
    /// A GEMV's input widened to f32.
    xf: Vec<f32>,
    pub(super) token: u32,
    pub(super) pos: usize,
    pub(super) next: u32,
}

/// `t`'s elements (contiguous, on the CPU, of dtype `T`) passed to `f`.
fn read<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::internal(format!("decode step: a CPU step was given a tensor on {:?}", t.device().location())));
    };
    let Some(all) = T::slice_of(cpu) else {
        return Err(Error::internal(format!("decode step: tensor of dtype {:?} in a step of another dtype", t.dtype())));
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Err(Error::internal(format!("decode step: a weight is not contiguous ({:?})", t.dims())));
    };
    Ok(f(&all[a..b]))
}

/// Writes one token's rows into a cache buffer in place.
struct WriteRows<'a, T> {
    rows: &'a [T],
    pos: usize,
    dims: RopeDims,
}

impl<T: Elem> InplaceOp1 for WriteRows<'_, T> {
    fn name(&self) -> &'static str {
        "expanse-write-kv-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = layout.contiguous_offsets() else { bail!("decode step: the KV cache is not contiguous") };
        let Some(all) = T::slice_of_mut(storage) else { bail!("decode step: KV cache of another dtype") };
        write_cache_rows(&mut all[a..b], self.rows, self.pos, &self.dims);
        Ok(())
    }
}

/// `acc = x · wᵀ` in f32 for the step weight `w`: our GEMV over a dense weight of `T`, or the
/// quantized product over a quantized one (the reference's own product for one row, so the step
/// keeps the reference decode's bits).
fn project<T: Elem + DotElem>(model: &Model, w: super::plan::Weight, x: &[f32], acc: &mut [f32]) -> Result<()> {
    match super::projection(model, w).and_then(|l| l.quantized()) {
        Some(q) => q.product_f32(x, 1, acc, crate::quant::cpu_product::Rows::Invariant),
        None => read(weight(model, w)?, |w: &[T]| gemv_rows(x, w, acc)),
    }
}

impl<T: Elem + DotElem> CpuExec<T> {
    pub(super) fn new(d: &Dims, splits: usize) -> CpuExec<T> {
        let widest = d.qkv().max(2 * d.intermediate).max(d.vocab).max(d.hidden);
        CpuExec {
            bufs: match Buffers::new(d, |n| Ok::<_, std::convert::Infallible>(vec![T::from_f32(0.0); n])) {
                Ok(b) => b,
                Err(never) => match never {},
            },
            partial: vec![0.0; if splits > 1 { d.n_heads * splits * (d.head_dim + 2) } else { 0 }],
            acc: vec![0.0; widest],
            xf: vec![0.0; d.hidden.max(d.intermediate).max(d.n_heads * d.head_dim)],
            token: 0,
            pos: 0,
            next: 0,
        }
    }

    /// Runs one op.
    pub(super) fn run(&mut self, op: &Op, model: &Model, cache: &Cache, d: &Dims, splits: usize) -> Result<()> {
        match op.kind {
            Kind::EmbedNorm { norm } => {
                let (tok, n) = (self.token as usize, d.hidden);
                let Buffers { x, h, .. } = &mut self.bufs;
                read(&model.embed_tokens, |e: &[T]| x.copy_from_slice(&e[tok * n..(tok + 1) * n]))?;
                read(weight(model, norm)?, |w| residual_rms_norm(x, None, w, d.eps, h))?;
            }
            Kind::AddNorm { norm } => {
                let Buffers { x, h, d: add, .. } = &mut self.bufs;
                read(weight(model, norm)?, |w| residual_rms_norm(x, Some(add), w, d.eps, h))?;
            }
            Kind::Gemv { w, src, dst } => {
                let n = self.widen(src);
                let rows = self.bufs.get(dst).len();
                let acc = &mut self.acc[..rows];
                project::<T>(model, w, &self.xf[..n], acc)?;
                for (o, &a) in self.bufs.get_mut(dst).iter_mut().zip(acc.iter()) {
                    *o = T::from_f32(a);
                }
            }
            Kind::GemvSiluMul { w } => {
                let n = self.widen(Buf::H);
                let acc = &mut self.acc[..2 * d.intermediate];
                project::<T>(model, w, &self.xf[..n], acc)?;
                silu_mul(acc, &mut self.bufs.act);
            }
            Kind::RopeKv { block } => self.rope_kv(model, cache, d, block)?,
            Kind::Attention { block } => self.attention(cache, d, block, splits)?,
            Kind::Argmax => self.next = argmax(&self.bufs.logits),
        }
        Ok(())
    }

    /// Widens buffer `b` into the GEMV input; returns its length.
    fn widen(&mut self, b: Buf) -> usize {
        let src = self.bufs.get(b);
        for (f, v) in self.xf.iter_mut().zip(src.iter()) {
            *f = v.to_f32();
        }
        src.len()
    }

    fn rope_kv(&mut self, model: &Model, cache: &Cache, d: &Dims, block: usize) -> Result<()> {
        let dims = d.rope();
        let (cos, sin) = model.rotary_tables();
        let half = d.head_dim / 2;
        let (pos, qkv) = (self.pos, &mut self.bufs.qkv);
        read(cos, |c: &[T]| read(sin, |s: &[T]| rope_qk(qkv, &c[pos * half..][..half], &s[pos * half..][..half], &dims)))??;
        let Some(kv) = cache.layer(block) else { return Err(Error::internal(format!("decode step: no KV cache for block {block}"))) };
        let (nq, nkv) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
        kv.k.inplace_op1(&WriteRows { rows: &qkv[nq..nq + nkv], pos, dims })?;
        kv.v.inplace_op1(&WriteRows { rows: &qkv[nq + nkv..nq + 2 * nkv], pos, dims })?;
        Ok(())
    }

    fn attention(&mut self, cache: &Cache, d: &Dims, block: usize, splits: usize) -> Result<()> {
        let Some(kv) = cache.layer(block) else { return Err(Error::internal(format!("decode step: no KV cache for block {block}"))) };
        let dims = d.attention(self.pos + 1);
        let q = &self.bufs.qkv[..d.n_heads * d.head_dim];
        let (y, partial) = (&mut self.bufs.y, &mut self.partial);
        // One split rounds where the reference's eager attention rounds (identical numerics on the
        // CPU); split partials are f32 throughout, as on the GPU.
        let eager = std::mem::size_of::<T>() < 4;
        read(&kv.k, |k: &[T]| {
            read(&kv.v, |v: &[T]| {
                if splits > 1 {
                    attention_partial(q, k, v, &dims, d.scale, splits, partial);
                    attention_combine(partial, dims.head_dim, splits, y)
                } else {
                    attention_into(q, k, v, &dims, d.scale, eager, y)
                }
            })
        })??;
        Ok(())
    }

    /// Buffer `b` as f32 (for checks).
    pub(super) fn read_buf(&self, b: Buf) -> Vec<f32> {
        self.bufs.get(b).iter().map(|v| v.to_f32()).collect()
    }

    /// Sets buffer `b` from f32 values, rounded to `T` (for checks and fault injection).
    pub(super) fn write_buf(&mut self, b: Buf, values: &[f32]) {
        for (o, &v) in self.bufs.get_mut(b).iter_mut().zip(values) {
            *o = T::from_f32(v);
        }
    }
}
