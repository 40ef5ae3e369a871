//! Single-query attention over the KV cache on the CPU: scores, softmax and the weighted sum of
//! values per query head, in f32, optionally rounding where transformers' eager attention rounds.

use super::{dispatch, has_avx2, Elem, PAR_THRESHOLD};
use crate::kernels::AttnDims;
use candle_core::{bail, CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;

/// `Σ a·b` in f32 with eight running sums (combined pairwise at the end): one serial accumulator
/// is a chain of dependent adds that cannot vectorise (float adds are not reassociated), which made
/// the scores loop latency-bound (286 µs per layer at 512 cached tokens).
#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (xs, ys) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = xs.remainder().iter().zip(ys.remainder()).map(|(&x, &y)| x * y.to_f32()).sum();
    for (x, y) in xs.zip(ys) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// One query head against its KV head's cached keys: scores, softmax and the weighted sum of values,
/// all in f32, rounded once into `out`. With `eager`, intermediates are also rounded to `T` where
/// transformers' eager attention rounds them (after q·kᵀ, after the scaling, after the softmax).
#[inline(always)]
#[allow(clippy::too_many_arguments)] // one head's q, k, v and the attention's parameters
fn attend_head<T: Elem>(q: &[T], k: &[T], v: &[T], d: &AttnDims, scale: f32, eager: bool, bh: usize, out: &mut [T]) {
    let hd = d.head_dim;
    let round = |x: f32| if eager { T::from_f32(x).to_f32() } else { x };
    let (b, h) = (bh / d.n_heads, bh % d.n_heads);
    let kvh = h / (d.n_heads / d.n_kv_heads);
    let qf: Vec<f32> = q[b * d.q_sb + h * d.q_sh..][..hd].iter().map(|x| x.to_f32()).collect();
    let kb = b * d.k_sb + kvh * d.k_sh;
    let vb = b * d.v_sb + kvh * d.v_sh;
    let mut scores: Vec<f32> = (d.kv_start..d.kv_end).map(|j| round(round(dot(&qf, &k[kb + j * d.k_ss..][..hd])) * scale)).collect();
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut l = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - m).exp();
        l += *s;
    }
    let mut acc = vec![0f32; hd];
    if eager {
        // The probabilities are rounded before they weight the values (so the sum is now 1).
        for s in scores.iter_mut() {
            *s = round(*s / l);
        }
        l = 1.0;
    }
    for (j, &p) in (d.kv_start..d.kv_end).zip(&scores) {
        for (a, &x) in acc.iter_mut().zip(&v[vb + j * d.v_ss..][..hd]) {
            *a += p * x.to_f32();
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = T::from_f32(a / l);
    }
}

/// `attend_head` compiled for AVX2: the same per-lane arithmetic in wider vectors, so the results
/// are bit-identical to the portable build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)] // one head's q, k, v and the attention's parameters
unsafe fn attend_head_avx2<T: Elem>(q: &[T], k: &[T], v: &[T], d: &AttnDims, scale: f32, eager: bool, bh: usize, out: &mut [T]) {
    attend_head(q, k, v, d, scale, eager, bh, out)
}

#[allow(clippy::too_many_arguments)] // a CustomOp3's three (storage, layout) operands, and the op's parameters
pub(crate) fn decode_attention(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    d: &AttnDims,
    scale: f32,
    eager_rounding: bool,
) -> Result<(CpuStorage, Shape)> {
    let (oq, ok, ov) = (l1.start_offset(), l2.start_offset(), l3.start_offset());
    fn inner<T: Elem>(q: &[T], k: &[T], v: &[T], d: &AttnDims, scale: f32, eager: bool) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); d.b * d.n_heads * d.head_dim];
        attention_into(q, k, v, d, scale, eager, &mut out);
        out
    }
    let out = dispatch!("decode_attention", (s1, s2, s3), |q, k, v| inner(&q[oq..], &k[ok..], &v[ov..], d, scale, eager_rounding));
    Ok((out, d.out_shape()))
}

/// Every query head's attention output into `out` (`[b, n_heads, head_dim]`), heads over rayon's
/// pool when the work is large enough.
pub(crate) fn attention_into<T: Elem>(q: &[T], k: &[T], v: &[T], d: &AttnDims, scale: f32, eager: bool, out: &mut [T]) {
    let hd = d.head_dim;
    let n_keys = d.kv_end - d.kv_start;
    let avx2 = has_avx2();
    let head = |bh: usize, out: &mut [T]| {
        if avx2 {
            // SAFETY: the CPU has AVX2 (checked at run time above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                attend_head_avx2(q, k, v, d, scale, eager, bh, out)
            }
        } else {
            attend_head(q, k, v, d, scale, eager, bh, out)
        }
    };
    if d.b * d.n_heads * n_keys * hd >= PAR_THRESHOLD {
        out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| head(bh, o));
    } else {
        out.chunks_mut(hd).enumerate().for_each(|(bh, o)| head(bh, o));
    }
}

/// The keys split `s` of `n_splits` covers: the attended range cut into equal chunks, the last ones
/// possibly empty. The CUDA kernel cuts the same way.
pub(crate) fn split_range(d: &AttnDims, n_splits: usize, s: usize) -> std::ops::Range<usize> {
    let chunk = (d.kv_end - d.kv_start).div_ceil(n_splits);
    let start = (d.kv_start + s * chunk).min(d.kv_end);
    start..(start + chunk).min(d.kv_end)
}

/// Split-KV ("flash decoding") first pass: for every head and split, the unnormalised
/// `acc = Σ exp(s_j − m)·v_j`, the split's max score `m` and `l = Σ exp(s_j − m)`, written to
/// `partial` as `[b·n_heads, n_splits, head_dim + 2]` (`m = −∞`, `l = 0` for an empty split). All f32.
pub(crate) fn attention_partial<T: Elem>(q: &[T], k: &[T], v: &[T], d: &AttnDims, scale: f32, n_splits: usize, partial: &mut [f32]) {
    let hd = d.head_dim;
    partial.par_chunks_mut(n_splits * (hd + 2)).enumerate().for_each(|(bh, row)| {
        let (b, h) = (bh / d.n_heads, bh % d.n_heads);
        let kvh = h / (d.n_heads / d.n_kv_heads);
        let qf: Vec<f32> = q[b * d.q_sb + h * d.q_sh..][..hd].iter().map(|x| x.to_f32()).collect();
        let (kb, vb) = (b * d.k_sb + kvh * d.k_sh, b * d.v_sb + kvh * d.v_sh);
        for (s, out) in row.chunks_mut(hd + 2).enumerate() {
            let keys = split_range(d, n_splits, s);
            let scores: Vec<f32> = keys.clone().map(|j| dot(&qf, &k[kb + j * d.k_ss..][..hd]) * scale).collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            out.fill(0.0);
            let mut l = 0f32;
            for (j, &sc) in keys.zip(&scores) {
                let p = (sc - m).exp();
                l += p;
                for (a, &x) in out[..hd].iter_mut().zip(&v[vb + j * d.v_ss..][..hd]) {
                    *a += p * x.to_f32();
                }
            }
            out[hd] = m;
            out[hd + 1] = l;
        }
    });
}

/// Split-KV second pass: merges the splits of `partial` into `out` (`[b·n_heads, head_dim]`),
/// rescaling each split by `exp(m_s − M)`; rounded once.
pub(crate) fn attention_combine<T: Elem>(partial: &[f32], head_dim: usize, n_splits: usize, out: &mut [T]) {
    for (row, o) in partial.chunks(n_splits * (head_dim + 2)).zip(out.chunks_mut(head_dim)) {
        let splits: Vec<&[f32]> = row.chunks(head_dim + 2).collect();
        let mb = splits.iter().map(|p| p[head_dim]).fold(f32::NEG_INFINITY, f32::max);
        let wts: Vec<f32> = splits.iter().map(|p| if p[head_dim] == f32::NEG_INFINITY { 0.0 } else { (p[head_dim] - mb).exp() }).collect();
        let lb: f32 = splits.iter().zip(&wts).map(|(p, w)| w * p[head_dim + 1]).sum();
        for (i, o) in o.iter_mut().enumerate() {
            let a: f32 = splits.iter().zip(&wts).map(|(p, w)| w * p[i]).sum();
            *o = T::from_f32(a / lb);
        }
    }
}
