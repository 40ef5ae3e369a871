//! Fused kernels for batch-1 decoding of a Mistral layer.
//!
//! Each op is a candle custom op with three implementations:
//! * CPU: a straightforward reference (f32 / bf16 / f16), also usable for
//!   CPU inference;
//! * CUDA (`--features cuda`): PTX compiled by `build.rs` from
//!   `kernels/cuda/*.cu` (embedded, loaded once per device through
//!   `CudaDevice::get_or_load_custom_func`);
//! * Metal (`--features metal`): `kernels/metal/*.metal`, compiled at run time.
//!
//! All ops compute in f32 and round to the storage dtype once per output
//! value. None of them support backprop (inference only).
//!
//! | fn | inputs | output |
//! |---|---|---|
//! | [`silu_mul`] | gate, up: same shape, contiguous | `silu(gate) * up` |
//! | [`add_rms_norm`] | x, residual `[.., hidden]` contiguous; weight `[hidden]` | `(x + residual, rms_norm(x + residual) * weight)` |
//! | [`decode_attention`] | q `[B, H, 1, D]`, k/v cache `[B, KVH, cap, D]` (any strides, last dim contiguous) | `[B, H, 1, D]` contiguous |

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

mod cpu;
pub use cpu::{gemm, gemv, prompt_attention, rms_norm, softmax_last_dim, swiglu};
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
#[cfg(test)]
mod tests;

/// Largest head dimension supported by the GPU attention kernels.
pub const MAX_HEAD_DIM: usize = 256;

// ---------------------------------------------------------------------------
// silu_mul

/// `silu(gate) * up` elementwise (the SwiGLU activation of a Mistral MLP),
/// computed in f32 and rounded once. `gate` and `up` must have the same
/// shape and dtype (f32, bf16 or f16) and be contiguous.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!("silu_mul: shape mismatch {:?} vs {:?}", gate.shape(), up.shape());
    }
    check_same_dtype("silu_mul", &[gate, up])?;
    if gate.elem_count() == 0 {
        return gate.zeros_like();
    }
    gate.apply_op2_no_bwd(up, &SiluMul)
}

pub(crate) struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "expanse-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::silu_mul(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::silu_mul(s1, l1, s2, l2)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        metal::silu_mul(s1, l1, s2, l2)
    }
}

// ---------------------------------------------------------------------------
// add_rms_norm

/// Fused residual add + RMSNorm: returns `(sum, normed)` with
/// `sum = x + residual` (rounded to the dtype, exactly what candle's `add`
/// gives) and `normed = sum / sqrt(mean(sum^2) + eps) * weight`, computed in
/// f32 from the rounded `sum` and rounded once.
///
/// Design: a candle custom op returns one tensor, so the op writes a single
/// `[2, ..x.shape]` buffer (one kernel launch, one allocation): index 0 is the
/// sum, index 1 the normed tensor. Both returned tensors are contiguous views
/// (with an offset) into that buffer; they share its storage, so the buffer
/// lives until both are dropped (2x the size of `x`, negligible for decode).
///
/// `x` and `residual`: same shape `[.., hidden]`, contiguous. `weight`:
/// `[hidden]`, contiguous. Same dtype (f32, bf16 or f16).
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if x.shape() != residual.shape() {
        bail!("add_rms_norm: x {:?} and residual {:?} differ in shape", x.shape(), residual.shape());
    }
    check_same_dtype("add_rms_norm", &[x, residual, weight])?;
    let hidden = match x.dims().last() {
        Some(&h) => h,
        None => bail!("add_rms_norm: x must have at least one dimension"),
    };
    if weight.dims() != [hidden] {
        bail!("add_rms_norm: weight {:?} must be [{hidden}]", weight.shape());
    }
    if x.elem_count() == 0 {
        return Ok(((x + residual)?, x.zeros_like()?));
    }
    let out = x.apply_op3_no_bwd(residual, weight, &AddRmsNorm { eps: eps as f32 })?;
    Ok((out.get(0)?, out.get(1)?))
}

pub(crate) struct AddRmsNorm {
    pub(crate) eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "expanse-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::add_rms_norm(s1, l1, s2, l2, s3, l3, self.eps)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::add_rms_norm(s1, l1, s2, l2, s3, l3, self.eps)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        metal::add_rms_norm(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

/// Shapes shared by the three backends: `(rows, cols)` of the `[rows, cols]`
/// view of `x`, after checking contiguity of all three inputs.
pub(crate) fn add_rms_norm_dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize)> {
    if !l1.is_contiguous() || !l2.is_contiguous() || !l3.is_contiguous() {
        bail!("add_rms_norm: x, residual and weight must be contiguous");
    }
    let cols = *l1.dims().last().unwrap_or(&1);
    let rows = l1.shape().elem_count() / cols.max(1);
    if l2.shape() != l1.shape() || l3.shape().elem_count() != cols {
        bail!("add_rms_norm: shapes {:?} {:?} {:?}", l1.shape(), l2.shape(), l3.shape());
    }
    Ok((rows, cols))
}

pub(crate) fn add_rms_norm_out_shape(l1: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l1.dims());
    Shape::from(dims)
}

// ---------------------------------------------------------------------------
// decode_attention

/// Single-query grouped-query attention reading the KV cache in place.
///
/// * `q`: `[B, n_heads, 1, D]`, the query for position `kv_len - 1`.
/// * `k_cache`, `v_cache`: `[B, n_kv_heads, cap, D]`; positions `0..kv_len`
///   are valid, the rest (a preallocated tail) is never read. Any strides
///   are accepted (a whole preallocated buffer, a `narrow` of it, or a
///   `[B, cap, KVH, D]` buffer `transpose(1, 2)`-ed) as long as the last dim
///   is contiguous (stride 1). Same for `q`.
/// * `sliding_window`: `Some(w)` attends to keys `j > (kv_len - 1) - w`, i.e.
///   the last `w` keys including the current one (Hugging Face Mistral
///   semantics); `None` attends to all `kv_len` keys.
/// * `scale`: usually `1 / sqrt(D)`.
///
/// Query head `h` uses kv head `h / (n_heads / n_kv_heads)`. Scores and the
/// softmax (max-subtracted) are computed in f32; output `[B, n_heads, 1, D]`,
/// contiguous, rounded once. GPU kernels support `D <= 256`.
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_len: usize,
    sliding_window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    run_decode_attention(q, k_cache, v_cache, DecodeAttention::new(kv_len, sliding_window, scale)?)
}

/// [`decode_attention`] rounding where transformers' eager attention rounds in a half dtype (CPU
/// only): scores `q·kᵀ` to the dtype, then `× scale` to the dtype, softmax in f32 rounded to the
/// dtype, then `Σ p·v` in f32 rounded once. For f32 it is [`decode_attention`].
pub fn decode_attention_eager_rounding(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_len: usize,
    sliding_window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    let mut op = DecodeAttention::new(kv_len, sliding_window, scale)?;
    if q.dtype() != DType::F32 {
        if !q.device().is_cpu() {
            bail!("decode_attention_eager_rounding: CPU only");
        }
        op.eager_rounding = true;
    }
    run_decode_attention(q, k_cache, v_cache, op)
}

fn run_decode_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, op: DecodeAttention) -> Result<Tensor> {
    check_same_dtype("decode_attention", &[q, k_cache, v_cache])?;
    // Validate eagerly so that errors are the same on every backend.
    op.dims(q.layout(), k_cache.layout(), v_cache.layout())?;
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

pub(crate) struct DecodeAttention {
    pub(crate) kv_len: usize,
    pub(crate) window: Option<usize>,
    pub(crate) scale: f32,
    /// Round intermediates to the storage dtype where transformers' eager attention does (CPU only).
    pub(crate) eager_rounding: bool,
}

/// Validated geometry of a decode_attention call (strides in elements).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub b: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// First attended key position.
    pub kv_start: usize,
    /// One past the last attended key position (= kv_len).
    pub kv_end: usize,
    pub q_sb: usize,
    pub q_sh: usize,
    pub k_sb: usize,
    pub k_sh: usize,
    pub k_ss: usize,
    pub v_sb: usize,
    pub v_sh: usize,
    pub v_ss: usize,
}

impl AttnDims {
    pub(crate) fn out_shape(&self) -> Shape {
        Shape::from((self.b, self.n_heads, 1, self.head_dim))
    }
}

impl DecodeAttention {
    pub(crate) fn new(kv_len: usize, window: Option<usize>, scale: f64) -> Result<Self> {
        if kv_len == 0 {
            bail!("decode_attention: kv_len must be >= 1");
        }
        if window == Some(0) {
            bail!("decode_attention: sliding_window must be >= 1 (or None)");
        }
        Ok(Self { kv_len, window, scale: scale as f32, eager_rounding: false })
    }

    pub(crate) fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<AttnDims> {
        let (b, n_heads, q_len, head_dim) = match lq.dims() {
            &[b, h, s, d] => (b, h, s, d),
            d => bail!("decode_attention: q must be [B, H, 1, D], got {d:?}"),
        };
        if q_len != 1 {
            bail!("decode_attention: q must have seq_len 1 (decode), got {q_len}");
        }
        let (kb, n_kv_heads, cap, kd) = match lk.dims() {
            &[b, h, s, d] => (b, h, s, d),
            d => bail!("decode_attention: k_cache must be [B, KVH, cap, D], got {d:?}"),
        };
        if lv.dims() != lk.dims() {
            bail!("decode_attention: v_cache {:?} must have k_cache's shape {:?}", lv.dims(), lk.dims());
        }
        if kb != b || kd != head_dim {
            bail!("decode_attention: q {:?} and k_cache {:?} disagree on B or D", lq.dims(), lk.dims());
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            bail!("decode_attention: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}");
        }
        if self.kv_len > cap {
            bail!("decode_attention: kv_len {} exceeds the cache capacity {cap}", self.kv_len);
        }
        if head_dim == 0 || b == 0 || n_heads == 0 {
            bail!("decode_attention: empty q {:?}", lq.dims());
        }
        for (name, l) in [("q", lq), ("k_cache", lk), ("v_cache", lv)] {
            if l.stride()[3] != 1 {
                bail!("decode_attention: {name} must be contiguous in its last dim (strides {:?})", l.stride());
            }
        }
        let (sq, sk, sv) = (lq.stride(), lk.stride(), lv.stride());
        let kv_start = match self.window {
            Some(w) => self.kv_len.saturating_sub(w),
            None => 0,
        };
        Ok(AttnDims {
            b,
            n_heads,
            n_kv_heads,
            head_dim,
            kv_start,
            kv_end: self.kv_len,
            q_sb: sq[0],
            q_sh: sq[1],
            k_sb: sk[0],
            k_sh: sk[1],
            k_ss: sk[2],
            v_sb: sv[0],
            v_sh: sv[1],
            v_ss: sv[2],
        })
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "expanse-decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1, l2, l3)?;
        cpu::decode_attention(s1, l1, s2, l2, s3, l3, &d, self.scale, self.eager_rounding)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.dims(l1, l2, l3)?;
        cuda::decode_attention(s1, l1, s2, l2, s3, l3, &d, self.scale)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let d = self.dims(l1, l2, l3)?;
        metal::decode_attention(s1, l1, s2, l2, s3, l3, &d, self.scale)
    }
}

// ---------------------------------------------------------------------------

fn check_same_dtype(op: &str, ts: &[&Tensor]) -> Result<()> {
    let dt = ts[0].dtype();
    if !matches!(dt, DType::F32 | DType::BF16 | DType::F16) {
        bail!("{op}: unsupported dtype {dt:?} (f32, bf16 or f16)");
    }
    for t in ts {
        if t.dtype() != dt {
            bail!("{op}: dtype mismatch {:?} vs {:?}", t.dtype(), dt);
        }
        if !t.device().same_device(ts[0].device()) {
            bail!("{op}: inputs on different devices");
        }
    }
    Ok(())
}

/// Contiguous element range of a layout, or an error naming the op.
pub(crate) fn contiguous_range(op: &str, what: &str, l: &Layout) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("{op}: {what} must be contiguous (shape {:?}, strides {:?})", l.dims(), l.stride()),
    }
}
