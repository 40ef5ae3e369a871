//! Causal (and sliding-window) attention of a prompt's queries against the KV cache on the CPU. The
//! masks are applied inside the computation: each task takes a block of query positions of one KV
//! head's query heads, computes scores only against the keys that block can see, and softmaxes each
//! row over its visible keys, so what is materialised is a block's rows × its key range (linear in
//! the length), never a `[s, len]` mask or a full `[heads, s, len]` score tensor. Scores and
//! weighted sums run on the register-blocked `block_matmul` kernel. Half dtypes round where
//! transformers' eager attention rounds (scores after q·kᵀ, after the scaling, probabilities after
//! the f32 softmax; the weighted sum once).

use super::block_matmul::{block_matmul, MR, NR};
use super::exp::exp_in_place;
use super::{dispatch, Elem};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query positions per task: 32 positions × (heads per KV head) rows share one pass over the keys.
const QB: usize = 32;

/// Attention of `q` `[B, H, s, D]` (positions `len − s .. len`) against `k`, `v` `[B, KVH, len, D]`
/// (any strides with the last dim contiguous: views of a preallocated cache), on the CPU. Query
/// position `p` sees key `j` iff `j ≤ p` and `p − j < sliding_window` (Hugging Face semantics).
/// Query head `h` uses KV head `h / (H / KVH)`. Returns `[B, s, H, D]`, contiguous, in q's dtype
/// (f32, bf16 or f16; one dtype for all three).
pub fn prompt_attention(q: &Tensor, k: &Tensor, v: &Tensor, sliding_window: Option<usize>, scale: f64) -> Result<Tensor> {
    if !q.device().is_cpu() {
        bail!("prompt_attention: CPU only");
    }
    if sliding_window == Some(0) {
        bail!("prompt_attention: sliding_window must be >= 1 (or None)");
    }
    let op = PromptAttention { window: sliding_window, scale: scale as f32 };
    op.geometry(q.layout(), k.layout(), v.layout())?;
    q.apply_op3_no_bwd(k, v, &op)
}

struct PromptAttention {
    window: Option<usize>,
    scale: f32,
}

/// Validated shapes and strides (in elements) of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    heads: usize,
    kv_heads: usize,
    s: usize,
    len: usize,
    d: usize,
    /// (batch, head, position) strides of q, k and v.
    q: [usize; 3],
    k: [usize; 3],
    v: [usize; 3],
}

impl PromptAttention {
    fn geometry(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Geometry> {
        let dims4 = |name: &str, l: &Layout| match *l.dims() {
            [a, b, c, d] => Ok((a, b, c, d)),
            ref d => bail!("prompt_attention: {name} must be 4-dimensional, got {d:?}"),
        };
        let (b, heads, s, d) = dims4("q", lq)?;
        let (kb, kv_heads, len, kd) = dims4("k", lk)?;
        if lv.dims() != lk.dims() {
            bail!("prompt_attention: v {:?} must have k's shape {:?}", lv.dims(), lk.dims());
        }
        if kb != b || kd != d || s > len {
            bail!("prompt_attention: q {:?} does not fit k {:?} (same B and D, s <= len)", lq.dims(), lk.dims());
        }
        if kv_heads == 0 || heads % kv_heads != 0 || d == 0 || s == 0 {
            bail!("prompt_attention: {heads} query heads, {kv_heads} KV heads, D {d}, s {s}");
        }
        for (name, l) in [("q", lq), ("k", lk), ("v", lv)] {
            if l.stride()[3] != 1 {
                bail!("prompt_attention: {name} must be contiguous in its last dim (strides {:?})", l.stride());
            }
        }
        let st = |l: &Layout| [l.stride()[0], l.stride()[1], l.stride()[2]];
        Ok(Geometry { b, heads, kv_heads, s, len, d, q: st(lq), k: st(lk), v: st(lv) })
    }
}

impl CustomOp3 for PromptAttention {
    fn name(&self) -> &'static str {
        "expanse-prompt-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1, l2, l3)?;
        let (oq, ok, ov) = (l1.start_offset(), l2.start_offset(), l3.start_offset());
        let out = dispatch!("prompt_attention", (s1, s2, s3), |q, k, v| self.run(&q[oq..], &k[ok..], &v[ov..], &g));
        Ok((out, Shape::from((g.b, g.s, g.heads, g.d))))
    }
}

impl PromptAttention {
    /// Every (batch, KV head, block of QB positions) is a task; their outputs are scattered into
    /// `[B, s, H, D]` afterwards.
    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T], g: &Geometry) -> Vec<T> {
        let blocks = g.s.div_ceil(QB);
        let tasks: Vec<(usize, usize, usize)> = (0..g.b).flat_map(|b| (0..g.kv_heads).flat_map(move |kvh| (0..blocks).map(move |blk| (b, kvh, blk)))).collect();
        let results: Vec<Vec<f32>> = tasks.par_iter().map(|&(b, kvh, blk)| self.block(q, k, v, g, b, kvh, blk * QB)).collect();
        let (rep, d) = (g.heads / g.kv_heads, g.d);
        let mut out = vec![T::from_f32(0.0); g.b * g.s * g.heads * d];
        for (&(b, kvh, blk), y) in tasks.iter().zip(&results) {
            let p0 = blk * QB;
            let qb = QB.min(g.s - p0);
            for (r, row) in y.chunks_exact(d.next_multiple_of(NR)).take(rep * qb).enumerate() {
                let (h, p) = (kvh * rep + r / qb, p0 + r % qb);
                let dst = &mut out[((b * g.s + p) * g.heads + h) * d..][..d];
                dst.iter_mut().zip(&row[..d]).for_each(|(o, &x)| *o = T::from_f32(x));
            }
        }
        out
    }

    /// Query positions `p0 .. p0 + QB` of KV head `kvh`'s query heads (rows head-major: row
    /// `r` is head `kvh·rep + r / qb`, position `p0 + r % qb`). Returns their outputs in f32, rows
    /// `D` rounded up to NR apart (and a few zero rows after them, to a multiple of MR).
    #[allow(clippy::too_many_arguments)] // one block's q, k, v, the geometry and where the block lies
    fn block<'a, T: Elem>(&self, q: &'a [T], k: &'a [T], v: &'a [T], g: &Geometry, b: usize, kvh: usize, p0: usize) -> Vec<f32> {
        let (rep, d, qb) = (g.heads / g.kv_heads, g.d, QB.min(g.s - p0));
        let offset = g.len - g.s;
        // Keys the block can see: up to its last position, from the first one's window start.
        let first_key = |p: usize| self.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let (j_lo, j_hi) = (first_key(offset + p0), offset + p0 + qb);
        let n_keys = j_hi - j_lo;
        // Zero-padded to whole micro-tiles: rows to MR, key and value columns to NR.
        let (rows, keys_p, d_p) = ((rep * qb).next_multiple_of(MR), n_keys.next_multiple_of(NR), d.next_multiple_of(NR));
        let row_of = |src: &'a [T], st: &[usize; 3], head: usize, pos: usize| -> &'a [T] { &src[b * st[0] + head * st[1] + pos * st[2]..][..d] };
        let widen = |dst: &mut [f32], src: &[T]| dst.iter_mut().zip(src).for_each(|(o, x)| *o = x.to_f32());
        let mut xq = vec![0f32; rows * d];
        for (r, dst) in xq.chunks_exact_mut(d).take(rep * qb).enumerate() {
            widen(dst, row_of(q, &g.q, kvh * rep + r / qb, p0 + r % qb));
        }
        // Keys transposed ([D, keys]) so scores are rows of queries times 16-key-wide rows; 16 keys
        // at a time, so each write is a run of 16.
        let mut keys_t = vec![0f32; d * keys_p];
        for j0 in (0..n_keys).step_by(NR) {
            let block: Vec<&[T]> = (j0..n_keys.min(j0 + NR)).map(|j| row_of(k, &g.k, kvh, j_lo + j)).collect();
            for (c, dst) in keys_t.chunks_exact_mut(keys_p).enumerate() {
                dst[j0..j0 + block.len()].iter_mut().zip(&block).for_each(|(o, row)| *o = row[c].to_f32());
            }
        }
        let mut scores = vec![0f32; rows * keys_p];
        block_matmul(&xq, d, rows, d, &keys_t, keys_p, keys_p, &mut scores, keys_p);
        for (r, row) in scores.chunks_exact_mut(keys_p).take(rep * qb).enumerate() {
            let p = offset + p0 + r % qb;
            softmax_visible(row, first_key(p) - j_lo, p + 1 - j_lo, self.scale, T::round_f32);
        }
        let mut values = vec![0f32; keys_p * d_p];
        for (j, dst) in values.chunks_exact_mut(d_p).take(n_keys).enumerate() {
            widen(&mut dst[..d], row_of(v, &g.v, kvh, j_lo + j));
        }
        let mut y = vec![0f32; rows * d_p];
        block_matmul(&scores, keys_p, rows, keys_p, &values, d_p, d_p, &mut y, d_p);
        y
    }
}

/// One row of raw scores `q·k` in, probabilities out: entries `lo..hi` are the visible keys
/// (`round(round(s) · scale)`, softmax in f32, rounded), the rest exactly 0. `round` rounds to the
/// storage dtype (identity for f32).
fn softmax_visible(row: &mut [f32], lo: usize, hi: usize, scale: f32, round: impl Fn(f32) -> f32) {
    let vis = &mut row[lo..hi];
    let mut max = f32::NEG_INFINITY;
    for x in vis.iter_mut() {
        *x = round(round(*x) * scale);
        max = max.max(*x);
    }
    vis.iter_mut().for_each(|x| *x -= max);
    exp_in_place(vis);
    let sum: f32 = vis.iter().sum();
    for x in vis.iter_mut() {
        *x = round(*x / sum);
    }
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{assert_close, rand_tensor, rng, to_vec_f32};
    use candle_core::{DType, Device, D};

    /// Transformers' eager attention composed from candle ops, in the same dtype, with an explicit
    /// additive mask (the way it is built there): `softmax_f32(q·kᵀ · scale + mask) · v`.
    fn eager_reference(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>, scale: f64) -> Tensor {
        let (b, h, s, d) = q.dims4().unwrap();
        let (kvh, len) = (k.dim(1).unwrap(), k.dim(2).unwrap());
        let rep = h / kvh;
        let expand = |t: &Tensor| t.unsqueeze(2).unwrap().repeat((1, 1, rep, 1, 1)).unwrap().reshape((b, h, len, d)).unwrap();
        let (k, v) = (expand(k), expand(v));
        let offset = len - s;
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| (0..len).map(move |j| (i + offset, j)))
            .map(|(p, j)| if j <= p && window.is_none_or(|w| p - j < w) { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let mask = Tensor::from_vec(mask, (s, len), &Device::Cpu).unwrap().to_dtype(q.dtype()).unwrap();
        let scores = (q.contiguous().unwrap().matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
        let scores = scores.broadcast_add(&mask).unwrap();
        let probs = candle_nn::ops::softmax(&scores.to_dtype(DType::F32).unwrap(), D::Minus1).unwrap().to_dtype(q.dtype()).unwrap();
        probs.matmul(&v.contiguous().unwrap()).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
    }

    #[test]
    fn prompt_attention_matches_eager_reference() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("prompt_attention_matches_eager_reference");
        // (batch, heads, kv heads, s, cached before, D, window): blocks of QB with a partial last
        // one, a prefix already cached, windows shorter and longer than the prompt, MHA and GQA.
        let cases = [
            (1, 9, 3, 70, 0, 64, None),
            (1, 4, 2, 33, 17, 16, None),
            (2, 4, 1, 40, 5, 8, Some(7)),
            (1, 2, 2, 5, 0, 8, Some(64)),
            (1, 6, 3, 2, 30, 32, Some(9)),
        ];
        for dtype in [DType::F32, DType::BF16] {
            for &(b, h, kvh, s, cached, d, window) in &cases {
                let len = s + cached;
                let q = rand_tensor(&mut rng, &[b, h, s, d], 1.0, dtype, &Device::Cpu);
                // The cache as the model holds it: a preallocated buffer, narrowed to len.
                let cap = len + 3;
                let k = rand_tensor(&mut rng, &[b, kvh, cap, d], 1.0, dtype, &Device::Cpu).narrow(2, 0, len).unwrap();
                let v = rand_tensor(&mut rng, &[b, kvh, cap, d], 1.0, dtype, &Device::Cpu).narrow(2, 0, len).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                let got = prompt_attention(&q, &k, &v, window, scale).unwrap();
                assert_eq!(got.dims(), &[b, s, h, d]);
                let want = eager_reference(&q, &k, &v, window, scale);
                let what = format!("{dtype:?} b{b} h{h}/{kvh} s{s}+{cached} d{d} window {window:?}");
                // bf16: a probability or score may round to the neighbouring bf16 when the f32 sums
                // differ in order; two bf16 ulps of the output's scale covers it.
                let (atol, rtol) = if dtype == DType::F32 { (1e-5, 1e-5) } else { (2e-2, 2e-2) };
                assert_close(&what, &got, &want, atol, rtol);
            }
        }
    }

    /// A query's output is the same bits whatever chunk of the prompt it runs in (where the chunk
    /// starts, how long it is, where the query falls in its block of QB): the keys and values already
    /// cached, f32 and bf16, with and without a window. Serve reuses cached prompt positions to the
    /// token on this (`Model::prompt_rows_invariant`).
    #[test]
    fn a_querys_output_does_not_depend_on_its_chunk() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("a_querys_output_does_not_depend_on_its_chunk");
        let (h, kvh, s, d) = (4, 2, 2 * QB + 11, 16);
        for dtype in [DType::F32, DType::BF16] {
            for window in [None, Some(9), Some(QB + 5)] {
                let q = rand_tensor(&mut rng, &[1, h, s, d], 1.0, dtype, &Device::Cpu);
                let k = rand_tensor(&mut rng, &[1, kvh, s, d], 1.0, dtype, &Device::Cpu);
                let v = rand_tensor(&mut rng, &[1, kvh, s, d], 1.0, dtype, &Device::Cpu);
                let bits = |t: &Tensor| to_vec_f32(t).iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                let all = bits(&prompt_attention(&q, &k, &v, window, 0.25).unwrap());
                assert!(all.iter().all(|&b| f32::from_bits(b).is_finite()), "{dtype:?} {window:?}: outputs not finite");
                // Chunk [start, end): its queries against the keys up to its end.
                for (start, end) in [(0, 2), (1, 3), (5, QB + 7), (QB - 1, QB + 1), (17, s), (s - 2, s)] {
                    let (qc, kc, vc) = (q.narrow(2, start, end - start).unwrap(), k.narrow(2, 0, end).unwrap(), v.narrow(2, 0, end).unwrap());
                    let part = bits(&prompt_attention(&qc, &kc, &vc, window, 0.25).unwrap());
                    let row = h * d;
                    for p in start..end {
                        let (got, want) = (&part[(p - start) * row..][..row], &all[p * row..][..row]);
                        assert!(got == want, "{dtype:?} window {window:?}: position {p} run in chunk {start}..{end} differs");
                    }
                }
            }
        }
    }

    #[test]
    fn prompt_attention_rejects_bad_shapes() {
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        assert!(prompt_attention(&t(&[1, 3, 4, 8]), &t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), None, 1.0).is_err(), "3 heads over 2 KV heads");
        assert!(prompt_attention(&t(&[1, 2, 5, 8]), &t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), None, 1.0).is_err(), "more queries than keys");
        assert!(prompt_attention(&t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), Some(0), 1.0).is_err(), "window 0");
    }
}
