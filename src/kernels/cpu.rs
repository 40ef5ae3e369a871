//! CPU reference implementations (f32 / bf16 / f16), f32 arithmetic,
//! rounded once per output value.

use super::{add_rms_norm_dims, add_rms_norm_out_shape, contiguous_range, AttnDims};
use candle_core::{bail, CpuStorage, Layout, Result, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

/// Storage element: exact widening to f32, round-to-nearest-even narrowing.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Work (elements) below which the CPU kernels stay single-threaded.
const PAR_THRESHOLD: usize = 1 << 15;

#[inline(always)]
pub(crate) fn silu_f32(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

macro_rules! dispatch {
    ($op:literal, ($($s:expr),+), |$($v:ident),+| $body:expr) => {
        match ($($s,)+) {
            ($(CpuStorage::F32($v),)+) => CpuStorage::F32($body),
            ($(CpuStorage::BF16($v),)+) => CpuStorage::BF16($body),
            ($(CpuStorage::F16($v),)+) => CpuStorage::F16($body),
            _ => bail!(concat!($op, ": unsupported or mismatched dtypes (f32, bf16, f16)")),
        }
    };
}

// ---------------------------------------------------------------------------

pub(crate) fn silu_mul(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (a0, a1) = contiguous_range("silu_mul", "gate", l1)?;
    let (b0, b1) = contiguous_range("silu_mul", "up", l2)?;
    if a1 - a0 != b1 - b0 {
        bail!("silu_mul: element count mismatch");
    }
    fn inner<T: Elem>(g: &[T], u: &[T]) -> Vec<T> {
        let f = |(&g, &u): (&T, &T)| T::from_f32(silu_f32(g.to_f32()) * u.to_f32());
        if g.len() >= PAR_THRESHOLD {
            g.par_iter().zip(u.par_iter()).map(f).collect()
        } else {
            g.iter().zip(u.iter()).map(f).collect()
        }
    }
    let out = dispatch!("silu_mul", (s1, s2), |g, u| inner(&g[a0..a1], &u[b0..b1]));
    Ok((out, l1.shape().clone()))
}

// ---------------------------------------------------------------------------

pub(crate) fn add_rms_norm(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    eps: f32,
) -> Result<(CpuStorage, Shape)> {
    let (rows, cols) = add_rms_norm_dims(l1, l2, l3)?;
    let (x0, x1) = contiguous_range("add_rms_norm", "x", l1)?;
    let (r0, r1) = contiguous_range("add_rms_norm", "residual", l2)?;
    let (w0, w1) = contiguous_range("add_rms_norm", "weight", l3)?;

    fn row<T: Elem>(x: &[T], r: &[T], w: &[T], sum: &mut [T], normed: &mut [T], eps: f32) {
        let mut ss = 0f32;
        for ((s, &x), &r) in sum.iter_mut().zip(x).zip(r) {
            *s = T::from_f32(x.to_f32() + r.to_f32());
            let sf = s.to_f32();
            ss += sf * sf;
        }
        let inv_rms = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((n, &s), &w) in normed.iter_mut().zip(sum.iter()).zip(w) {
            *n = T::from_f32(s.to_f32() * inv_rms * w.to_f32());
        }
    }
    fn inner<T: Elem>(x: &[T], r: &[T], w: &[T], rows: usize, cols: usize, eps: f32) -> Vec<T> {
        let n = rows * cols;
        let mut out = vec![T::from_f32(0.0); 2 * n];
        let (sum, normed) = out.split_at_mut(n);
        if n >= PAR_THRESHOLD && rows > 1 {
            sum.par_chunks_mut(cols)
                .zip(normed.par_chunks_mut(cols))
                .zip(x.par_chunks(cols).zip(r.par_chunks(cols)))
                .for_each(|((s, nm), (x, r))| row(x, r, w, s, nm, eps));
        } else {
            for (((s, nm), x), r) in sum
                .chunks_mut(cols)
                .zip(normed.chunks_mut(cols))
                .zip(x.chunks(cols))
                .zip(r.chunks(cols))
            {
                row(x, r, w, s, nm, eps);
            }
        }
        out
    }
    let out = dispatch!("add_rms_norm", (s1, s2, s3), |x, r, w| inner(
        &x[x0..x1],
        &r[r0..r1],
        &w[w0..w1],
        rows,
        cols,
        eps
    ));
    Ok((out, add_rms_norm_out_shape(l1)))
}

// ---------------------------------------------------------------------------

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
#[allow(clippy::too_many_arguments)]
fn attend_head<T: Elem>(q: &[T], k: &[T], v: &[T], d: &AttnDims, scale: f32, eager: bool, bh: usize, out: &mut [T]) {
    let hd = d.head_dim;
    let round = |x: f32| if eager { T::from_f32(x).to_f32() } else { x };
    let (b, h) = (bh / d.n_heads, bh % d.n_heads);
    let kvh = h / (d.n_heads / d.n_kv_heads);
    let qf: Vec<f32> = q[b * d.q_sb + h * d.q_sh..][..hd].iter().map(|x| x.to_f32()).collect();
    let kb = b * d.k_sb + kvh * d.k_sh;
    let vb = b * d.v_sb + kvh * d.v_sh;
    let mut scores: Vec<f32> =
        (d.kv_start..d.kv_end).map(|j| round(round(dot(&qf, &k[kb + j * d.k_ss..][..hd])) * scale)).collect();
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
#[allow(clippy::too_many_arguments)]
unsafe fn attend_head_avx2<T: Elem>(q: &[T], k: &[T], v: &[T], d: &AttnDims, scale: f32, eager: bool, bh: usize, out: &mut [T]) {
    attend_head(q, k, v, d, scale, eager, bh, out)
}

#[allow(clippy::too_many_arguments)]
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
        let hd = d.head_dim;
        let n_keys = d.kv_end - d.kv_start;
        let avx2 = crate::cpu_kernels::has_avx2();
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
        let mut out = vec![T::from_f32(0.0); d.b * d.n_heads * hd];
        if d.b * d.n_heads * n_keys * hd >= PAR_THRESHOLD {
            out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| head(bh, o));
        } else {
            out.chunks_mut(hd).enumerate().for_each(|(bh, o)| head(bh, o));
        }
        out
    }
    let out = dispatch!("decode_attention", (s1, s2, s3), |q, k, v| inner(
        &q[oq..],
        &k[ok..],
        &v[ov..],
        d,
        scale,
        eager_rounding
    ));
    Ok((out, d.out_shape()))
}
