//! expanse's own kernels. Sources of the GPU kernels live in `kernels/` (one kernel per file: CUDA in
//! `kernels/cuda/`, Metal in `kernels/metal/`); this module holds the CUDA launches (`launch`: grid,
//! block and arguments, in one place) and their executors (`cuda/` on a device, `emulated` on the CPU
//! emulator of the CUDA sources in tests), the Metal launcher (`metal`), and the CPU implementations
//! (`cpu/`), which serve CPU inference and are what the GPU kernels are tested against (`tests`). All
//! compute in f32 and round to the storage dtype where the reference forward pass rounds.
//!
//! | kernel | CPU | CUDA | Metal | what |
//! |---|---|---|---|---|
//! | gemv | `cpu::gemv` | `gemv.cu` | – | one row times a weight; the SwiGLU epilogue variant |
//! | gemm | `cpu::gemm` (+ `block_matmul`) | – | – | prompts: register-blocked, no packing |
//! | swiglu | `cpu::swiglu` | – | – | prompts: stacked gate/up GEMM with the SiLU·up epilogue |
//! | prompt attention | `cpu::prompt_attention` | – | – | prompts: blocked, causal/window masks applied inside |
//! | add | `cpu::add` | – | – | prompts: the residual adds, one rounding |
//! | rms norm | `cpu::norm` | `residual_norm.cu` | – | RMSNorm of prompts; residual add (or embedding row) + RMSNorm of the step |
//! | rope_kv | `cpu::rope` | `rope_kv.cu` | – | RoPE on q and k, k and v written into the cache |
//! | rope heads | `cpu::rope` | – | – | prompts: the stacked q/k/v split into heads, q and k rotated |
//! | decode attention | `cpu::attention` | `decode_attention.cu` | `decode_attention.metal` | one query over the cache, split-KV |
//! | argmax | `cpu::argmax` | `argmax.cu` | – | greedy choice on the device |
//! | softmax | `cpu::softmax` | – | – | small f32 softmax on the calling thread |
//! | exp | `cpu::exp` | – | – | vectorised exp (within 2 ulp) for the prompt kernels |
//! | random normal | `cpu::random` | `random_normal.cu` | – | synthetic weights from a counter-based hash |
//!
//! [`add`], [`decode_attention`], [`gemv`], [`gemm`], [`swiglu`], [`rms_norm`], [`rope_heads`] and [`prompt_attention`] are also candle ops, used by the reference forward pass on the
//! CPU; the decode step (`crate::step`) calls the kernels directly on its own buffers.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

pub(crate) mod cpu;
pub use cpu::tier;
pub use cpu::{add, gemm, gemv, gemv_batch, prompt_attention, rms_norm, rope_heads, softmax_last_dim, swiglu};
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(test)]
pub(crate) mod emulated;
// Pure arithmetic on shapes; the CPU-only build reads only the attention split count from it.
#[cfg_attr(not(any(feature = "cuda", test)), allow(dead_code))]
pub(crate) mod launch;
#[cfg(feature = "metal")]
mod metal;
#[cfg(test)]
pub(crate) mod tests;

/// The lib's test binary allocates through the emulator's guard, so that a test can put the buffers
/// it allocates against inaccessible pages (`guard_buffers`); outside a scope it is `System`.
#[cfg(test)]
#[global_allocator]
static ALLOC: expanse_cuda_emulator::guard::GuardedAlloc = expanse_cuda_emulator::guard::GuardedAlloc;

/// For a test: the buffers it allocates on this thread lie between guard pages while the value
/// lives, so a kernel's access past a buffer's end, or into a freed one, faults and is reported
/// (`expanse_cuda_emulator::guard`; the CPU kernels' raw-pointer loops and the emulated CUDA ones).
#[cfg(test)]
pub(crate) fn guard_buffers() -> expanse_cuda_emulator::guard::Scope {
    expanse_cuda_emulator::guard::scope()
}

/// As `guard_buffers`, with the guard page before each buffer: accesses before its start fault.
#[cfg(test)]
pub(crate) fn guard_buffers_front() -> expanse_cuda_emulator::guard::Scope {
    expanse_cuda_emulator::guard::scope_front()
}

/// Largest head dimension supported by the GPU attention kernels.
pub const MAX_HEAD_DIM: usize = 256;

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
pub fn decode_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, kv_len: usize, sliding_window: Option<usize>, scale: f64) -> Result<Tensor> {
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

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
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
        cuda::decode_attention(s1, l1, s2, l2, s3, l3, &d, self.scale, self.window)
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

/// The suffix of a kernel's name for its storage dtype (`expanse_gemv_bf16`).
#[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
pub(crate) fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => bail!("expanse kernels: unsupported dtype {dt:?}"),
    })
}

/// A 32-bit hash of (`seed`, `i`) (for reproducible pseudo-random ids in tests and benches).
pub fn hash_u32(seed: u64, i: u64) -> u32 {
    (cpu::mix64(seed ^ cpu::mix64(i)) >> 32) as u32
}

/// Fills `t` in place with `mean + std · N(0, 1)` numbers that depend only on (`seed`, element
/// index), rounded once to its dtype: the same weights on the CPU and on CUDA (up to the last ulp of
/// the GPU's `logf`/`cosf`), made in parallel without a generator's state. Other devices: an error.
pub fn fill_normal(t: &Tensor, seed: u64, mean: f32, std: f32) -> Result<()> {
    t.inplace_op1(&FillNormal { seed, mean, std })
}

struct FillNormal {
    seed: u64,
    mean: f32,
    std: f32,
}

impl candle_core::InplaceOp1 for FillNormal {
    fn name(&self) -> &'static str {
        "expanse-fill-normal"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("fill_normal: the tensor must be contiguous") };
        match s {
            CpuStorage::F32(v) => cpu::fill_normal(&mut v[a..b], self.seed, self.mean, self.std),
            CpuStorage::BF16(v) => cpu::fill_normal(&mut v[a..b], self.seed, self.mean, self.std),
            CpuStorage::F16(v) => cpu::fill_normal(&mut v[a..b], self.seed, self.mean, self.std),
            _ => bail!("fill_normal: f32, bf16 or f16 only"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use candle_core::backend::BackendStorage;
        if !l.is_contiguous() {
            bail!("fill_normal: the tensor must be contiguous");
        }
        let dev = s.device.clone();
        let ptr = cuda::storage_ptr(s, l.start_offset(), &dev.cuda_stream())?;
        cuda::random_normal(&dev, s.dtype(), ptr, l.shape().elem_count(), self.seed, self.mean, self.std)
    }
}
