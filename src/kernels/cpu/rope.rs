//! Rotary embedding on the CPU: a prompt's stacked q/k/v projection split into rotated heads (a candle
//! op, [`rope_heads`]), and one position's q and k rotated with k and v written into the KV cache (the
//! decode step's `rope_kv` op). One rotation function serves both, so the step and the reference path
//! agree bit for bit.

use super::{contiguous_range, dispatch, Elem, PAR_THRESHOLD};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Shapes of one `rope_kv` call. Heads are `head_dim` wide; the cache of one KV head is `capacity`
/// rows of `head_dim` (`[n_kv_heads, capacity, head_dim]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

/// Rotates `head` in place by the position's `cos`/`sin` rows (`head_dim / 2` each), the
/// rotate-half form, rounding each product and the sum to `T` as candle's `rope` (and transformers)
/// do in a half dtype.
#[inline(always)]
fn rotate<T: Elem>(head: &mut [T], cos: &[T], sin: &[T]) {
    let half = head.len() / 2;
    let r = |x: f32| T::from_f32(x).to_f32();
    for i in 0..half {
        let (x1, x2) = (head[i].to_f32(), head[i + half].to_f32());
        let (c, s) = (cos[i].to_f32(), sin[i].to_f32());
        head[i] = T::from_f32(r(x1 * c) - r(x2 * s));
        head[i + half] = T::from_f32(r(x1 * s) + r(x2 * c));
    }
}

/// `qkv` = `[q (n_heads·d) | k (n_kv·d) | v (n_kv·d)]` of one token: rotates its q and k heads in
/// place by the position's `cos`/`sin` rows.
pub(crate) fn rope_qk<T: Elem>(qkv: &mut [T], cos: &[T], sin: &[T], d: &RopeDims) {
    let hd = d.head_dim;
    for head in qkv[..(d.n_heads + d.n_kv_heads) * hd].chunks_mut(hd) {
        rotate(head, cos, sin);
    }
}

/// Writes one token's `rows` (`n_kv` heads of `head_dim`) into row `pos` of each head of `cache`
/// (`[n_kv, capacity, head_dim]`).
pub(crate) fn write_cache_rows<T: Elem>(cache: &mut [T], rows: &[T], pos: usize, d: &RopeDims) {
    let hd = d.head_dim;
    for (h, src) in rows.chunks(hd).enumerate() {
        let at = (h * d.capacity + pos) * hd;
        cache[at..at + hd].copy_from_slice(src);
    }
}

/// The whole `rope_kv` op on slices (what the CUDA kernel does in one launch, and is tested against):
/// rotates q and k in `qkv`, and writes k and v into row `pos` of the caches. The step itself writes
/// the rows through candle's in-place interface instead (`step::cpu`).
#[cfg(test)]
pub(crate) fn rope_kv<T: Elem>(qkv: &mut [T], cos: &[T], sin: &[T], k_cache: &mut [T], v_cache: &mut [T], pos: usize, d: &RopeDims) {
    rope_qk(qkv, cos, sin, d);
    let (nq, nkv) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
    write_cache_rows(k_cache, &qkv[nq..nq + nkv], pos, d);
    write_cache_rows(v_cache, &qkv[nq + nkv..nq + 2 * nkv], pos, d);
}

/// A prompt's stacked projection `qkv` `[b, s, heads·head_dim]` as heads `[b, heads, s, head_dim]`, the
/// first `rotated` heads (q's and k's) rotated by the positions' `cos`/`sin` rows `[s, head_dim/2]`
/// exactly as candle's `rope` rotates them, the rest (v's) copied. One pass over the projection, where
/// candle's ops take a strided copy per head group and a rope call each for q and k (whose bf16 loop
/// converts every element on its own: 4 % of a bf16 prompt). CPU only: None elsewhere or for inputs it
/// does not take (the caller composes candle's ops).
pub fn rope_heads(qkv: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize, rotated: usize) -> Option<Result<Tensor>> {
    let (_, s, width) = qkv.dims3().ok()?;
    let ok = qkv.device().is_cpu()
        && matches!(qkv.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && cos.dtype() == qkv.dtype()
        && sin.dtype() == qkv.dtype()
        && head_dim.is_multiple_of(2)
        && head_dim > 0
        && s > 0
        && width % head_dim == 0
        && rotated <= width / head_dim
        && cos.dims() == [s, head_dim / 2]
        && sin.dims() == [s, head_dim / 2];
    if !ok {
        return None;
    }
    let op = RopeHeads { head_dim, rotated };
    Some((|| qkv.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op))())
}

struct RopeHeads {
    head_dim: usize,
    rotated: usize,
}

impl RopeHeads {
    /// `out` `[b, heads, s, d]` from `qkv` `[b, s, heads·d]`: each task one (batch, head) plane.
    fn split<T: Elem>(&self, qkv: &[T], cos: &[T], sin: &[T], (b, s, heads): (usize, usize, usize)) -> Vec<T> {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let mut out = vec![T::from_f32(0.0); qkv.len()];
        let plane = |(bh, dst): (usize, &mut [T])| {
            let (bi, h) = (bh / heads, bh % heads);
            for (t, row) in dst.chunks_exact_mut(d).enumerate() {
                row.copy_from_slice(&qkv[((bi * s + t) * heads + h) * d..][..d]);
                if h < self.rotated {
                    rotate(row, &cos[t * half..][..half], &sin[t * half..][..half]);
                }
            }
        };
        if qkv.len() >= PAR_THRESHOLD {
            out.par_chunks_mut(s * d).enumerate().for_each(plane);
        } else {
            out.chunks_mut(s * d).enumerate().for_each(plane);
        }
        debug_assert_eq!(out.len(), b * heads * s * d);
        out
    }
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "expanse-rope-heads"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, s, width) = l1.shape().dims3()?;
        let heads = width / self.head_dim;
        if heads * self.head_dim != width || l2.dims() != [s, self.head_dim / 2] || l3.dims() != l2.dims() {
            bail!("rope_heads: qkv {:?}, cos {:?} and sin {:?} disagree (head_dim {})", l1.dims(), l2.dims(), l3.dims(), self.head_dim);
        }
        let (x0, x1) = contiguous_range("rope_heads", "qkv", l1)?;
        let (c0, c1) = contiguous_range("rope_heads", "cos", l2)?;
        let (n0, n1) = contiguous_range("rope_heads", "sin", l3)?;
        let out = dispatch!("rope_heads", (s1, s2, s3), |x, c, n| self.split(&x[x0..x1], &c[c0..c1], &n[n0..n1], (b, s, heads)));
        Ok((out, Shape::from((b, heads, s, self.head_dim))))
    }
}
