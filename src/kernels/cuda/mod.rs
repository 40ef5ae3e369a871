//! CUDA launches of the PTX that build.rs compiles from kernels/cuda/*.cu. Every kernel's launch
//! parameters are computed here, in one place; the kernels take raw device addresses, so the decode
//! step can launch them on its own buffers (and capture them in a graph) without candle allocating.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::cpu::RopeDims;
use super::{AttnDims, MAX_HEAD_DIM};

/// (module name in candle's per-device cache, PTX) of every kernel file.
const MODULES: [(&str, &str); 6] = [
    ("expanse_residual_norm", include_str!(concat!(env!("OUT_DIR"), "/residual_norm.ptx"))),
    ("expanse_gemv", include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"))),
    ("expanse_rope_kv", include_str!(concat!(env!("OUT_DIR"), "/rope_kv.ptx"))),
    ("expanse_decode_attention", include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"))),
    ("expanse_argmax", include_str!(concat!(env!("OUT_DIR"), "/argmax.ptx"))),
    ("expanse_random_normal", include_str!(concat!(env!("OUT_DIR"), "/random_normal.ptx"))),
];

/// Warps (= output rows) per GEMV block.
const GEMV_WARPS: u32 = 8;
/// Warps per decode-attention block (NW in decode_attention.cu).
const ATTN_WARPS: u32 = 4;

/// A device address and the number of elements behind it (what every launch argument is).
pub(crate) type DevPtr = u64;

fn i32_arg(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} does not fit in i32")))
}

/// The decode-attention kernel variant for a head dimension (PER = ceil(D / 32) lanes' share).
fn attention_variant(head_dim: usize) -> Result<&'static str> {
    Ok(match head_dim {
        0 => bail!("decode_attention: head_dim 0"),
        1..=64 => "d64",
        65..=128 => "d128",
        129..=MAX_HEAD_DIM => "d256",
        d => bail!("decode_attention: head_dim {d} > {MAX_HEAD_DIM} is not supported on CUDA"),
    })
}

/// Every expanse kernel of one dtype, loaded for one device. Loading happens here, all at once,
/// because a module must not be loaded while a graph is being captured.
pub(crate) struct CudaKernels {
    stream: Arc<CudaStream>,
    residual_norm: CudaFunction,
    gemv: CudaFunction,
    gemv_silu_mul: CudaFunction,
    rope_kv: CudaFunction,
    attention: CudaFunction,
    attention_combine: CudaFunction,
    argmax: CudaFunction,
}

/// One decode-attention launch: where q, the cache and the output live, and which keys to attend.
pub(crate) struct AttnLaunch {
    pub q: DevPtr,
    pub k: DevPtr,
    pub v: DevPtr,
    pub out: DevPtr,
    /// `[n_heads, n_splits, head_dim + 2]` f32 scratch (unused with one split).
    pub partial: DevPtr,
    /// The step's state (kv_len = state[STATE_POS] + 1), or 0 to use `kv_len`.
    pub state: DevPtr,
    pub kv_len: usize,
    /// Sliding window (0: none).
    pub window: usize,
    pub splits: usize,
    pub scale: f32,
    /// Heads and strides (kv_start/kv_end unused: the kernel derives them).
    pub dims: AttnDims,
}

impl CudaKernels {
    pub(crate) fn load(dev: &CudaDevice, dtype: DType, head_dim: usize) -> Result<CudaKernels> {
        let sfx = super::dtype_suffix(dtype)?;
        let f = |module: usize, name: String| -> Result<CudaFunction> {
            let (mdl, ptx) = MODULES[module];
            Ok(dev.get_or_load_custom_func(&name, mdl, ptx)?.into_cuda_function())
        };
        Ok(CudaKernels {
            stream: dev.cuda_stream(),
            residual_norm: f(0, format!("expanse_residual_norm_{sfx}"))?,
            gemv: f(1, format!("expanse_gemv_{sfx}"))?,
            gemv_silu_mul: f(1, format!("expanse_gemv_silu_mul_{sfx}"))?,
            rope_kv: f(2, format!("expanse_rope_kv_{sfx}"))?,
            attention: f(3, format!("expanse_decode_attn_{sfx}_{}", attention_variant(head_dim)?))?,
            attention_combine: f(3, format!("expanse_decode_attn_combine_{sfx}"))?,
            argmax: f(4, format!("expanse_argmax_{sfx}"))?,
        })
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `'a` is the caller's scope: the builder holds references to the caller's argument values.
    fn launch<'a>(&'a self, func: &'a CudaFunction, grid: (u32, u32, u32), block: u32, args: impl FnOnce(&mut LaunchArgs<'a>)) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(func);
        args(&mut b);
        // SAFETY: every caller pushes the argument list of the kernel it launches (named beside it),
        // with addresses of live device buffers of the sizes the kernel reads.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// `x = table[state.token]` (table ≠ 0) or `x += add` (add ≠ 0), then `h = rms_norm(x) · w`
    /// (`expanse_residual_norm_*`). One block for the row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn residual_norm(&self, x: DevPtr, add: DevPtr, table: DevPtr, state: DevPtr, w: DevPtr, h: DevPtr, cols: usize, eps: f32) -> Result<()> {
        let cols = i32_arg("hidden_size", cols)?;
        self.launch(&self.residual_norm, (1, 1, 1), 1024, |b| {
            b.arg(&x).arg(&add).arg(&table).arg(&state).arg(&w).arg(&h).arg(&cols).arg(&eps);
        })
    }

    /// `y = round(w · x)` for `w` `[rows, cols]` (`expanse_gemv_*`): one warp per row.
    pub(crate) fn gemv(&self, w: DevPtr, x: DevPtr, y: DevPtr, rows: usize, cols: usize) -> Result<()> {
        let grid = (rows.div_ceil(GEMV_WARPS as usize) as u32, 1, 1);
        let (rows, cols) = (i32_arg("rows", rows)?, i32_arg("cols", cols)?);
        self.launch(&self.gemv, grid, GEMV_WARPS * 32, |b| {
            b.arg(&w).arg(&x).arg(&y).arg(&rows).arg(&cols);
        })
    }

    /// `y = silu(gate · x) · (up · x)` for the stacked `w` `[2n, cols]` (`expanse_gemv_silu_mul_*`).
    pub(crate) fn gemv_silu_mul(&self, w: DevPtr, x: DevPtr, y: DevPtr, n: usize, cols: usize) -> Result<()> {
        let grid = (n.div_ceil(GEMV_WARPS as usize) as u32, 1, 1);
        let (n, cols) = (i32_arg("intermediate_size", n)?, i32_arg("cols", cols)?);
        self.launch(&self.gemv_silu_mul, grid, GEMV_WARPS * 32, |b| {
            b.arg(&w).arg(&x).arg(&y).arg(&n).arg(&cols);
        })
    }

    /// RoPE on q and k of `qkv` at `state.pos`, k and v written into the caches (`expanse_rope_kv_*`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_kv(&self, qkv: DevPtr, cos: DevPtr, sin: DevPtr, k_cache: DevPtr, v_cache: DevPtr, state: DevPtr, d: &RopeDims) -> Result<()> {
        let total = (d.n_heads + d.n_kv_heads) * d.head_dim / 2 + d.n_kv_heads * d.head_dim;
        let grid = (total.div_ceil(256) as u32, 1, 1);
        let (nh, nkv) = (i32_arg("n_heads", d.n_heads)?, i32_arg("n_kv_heads", d.n_kv_heads)?);
        let (hd, cap) = (i32_arg("head_dim", d.head_dim)?, i32_arg("capacity", d.capacity)?);
        self.launch(&self.rope_kv, grid, 256, |b| {
            b.arg(&qkv).arg(&cos).arg(&sin).arg(&k_cache).arg(&v_cache).arg(&state).arg(&nh).arg(&nkv).arg(&hd).arg(&cap);
        })
    }

    /// The split-KV first pass (`expanse_decode_attn_*_d{64,128,256}`): the final output with one
    /// split, partials for `attention_combine` otherwise. Grid (heads, splits, batch).
    pub(crate) fn attention(&self, a: &AttnLaunch) -> Result<()> {
        let d = &a.dims;
        if a.splits == 0 || a.splits > 65_535 || d.b > 65_535 {
            bail!("decode_attention: {} splits × batch {} is out of range", a.splits, d.b);
        }
        let grid = (d.n_heads as u32, a.splits as u32, d.b as u32);
        let (nh, nkv, hd) = (i32_arg("n_heads", d.n_heads)?, i32_arg("n_kv_heads", d.n_kv_heads)?, i32_arg("head_dim", d.head_dim)?);
        let strides = [d.q_sb, d.q_sh, d.k_sb, d.k_sh, d.k_ss, d.v_sb, d.v_sh, d.v_ss].map(|s| s as i64);
        let (kv_len, window) = (i32_arg("kv_len", a.kv_len)?, i32_arg("sliding_window", a.window)?);
        self.launch(&self.attention, grid, ATTN_WARPS * 32, |b| {
            b.arg(&a.q).arg(&a.k).arg(&a.v).arg(&a.out).arg(&a.partial).arg(&nh).arg(&nkv).arg(&hd);
            for s in &strides {
                b.arg(s);
            }
            b.arg(&a.state).arg(&kv_len).arg(&window).arg(&a.scale);
        })
    }

    /// The split-KV second pass (`expanse_decode_attn_combine_*`). Grid (heads, 1, batch).
    pub(crate) fn attention_combine(&self, partial: DevPtr, out: DevPtr, dims: &AttnDims, splits: usize) -> Result<()> {
        let threads = (dims.head_dim as u32).next_multiple_of(32).clamp(32, 256);
        let grid = (dims.n_heads as u32, 1, dims.b as u32);
        let (nh, hd, ns) = (i32_arg("n_heads", dims.n_heads)?, i32_arg("head_dim", dims.head_dim)?, i32_arg("splits", splits)?);
        self.launch(&self.attention_combine, grid, threads, |b| {
            b.arg(&partial).arg(&out).arg(&nh).arg(&hd).arg(&ns);
        })
    }

    /// `state.next = argmax(logits)` (`expanse_argmax_*`). One block.
    pub(crate) fn argmax(&self, logits: DevPtr, n: usize, state: DevPtr) -> Result<()> {
        let n = i32_arg("vocab_size", n)?;
        self.launch(&self.argmax, (1, 1, 1), 1024, |b| {
            b.arg(&logits).arg(&n).arg(&state);
        })
    }
}

/// The device address of element `offset` of a CUDA tensor's storage.
pub(crate) fn storage_ptr(s: &CudaStorage, offset: usize, stream: &CudaStream) -> Result<DevPtr> {
    fn ptr<T: CudaDType>(s: &CudaStorage, offset: usize, stream: &CudaStream) -> Result<DevPtr> {
        let slice = s.as_cuda_slice::<T>()?;
        let (p, _sync) = slice.device_ptr(stream);
        Ok(p + (offset * std::mem::size_of::<T>()) as u64)
    }
    use candle_core::backend::BackendStorage;
    match s.dtype() {
        DType::F32 => ptr::<f32>(s, offset, stream),
        DType::BF16 => ptr::<bf16>(s, offset, stream),
        DType::F16 => ptr::<f16>(s, offset, stream),
        DType::U32 => ptr::<u32>(s, offset, stream),
        dt => bail!("expanse kernels: unsupported dtype {dt:?}"),
    }
}

/// `out[i] = mean + std · normal(seed, i)` for the `n` elements of `out` on `dev`
/// (`expanse_random_normal_*`): a grid-stride loop over at most 4096 blocks.
pub(crate) fn random_normal(dev: &CudaDevice, dtype: DType, out: DevPtr, n: usize, seed: u64, mean: f32, std: f32) -> Result<()> {
    let (mdl, ptx) = MODULES[5];
    let func = dev.get_or_load_custom_func(&format!("expanse_random_normal_{}", super::dtype_suffix(dtype)?), mdl, ptx)?.into_cuda_function();
    let stream = dev.cuda_stream();
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (n, seed) = (n as u64, seed);
    let mut b = stream.launch_builder(&func);
    b.arg(&out).arg(&n).arg(&seed).arg(&mean).arg(&std);
    // SAFETY: the argument list of `expanse_random_normal_*`; `out` holds `n` elements of `dtype`.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The device address of a contiguous CUDA tensor's first element.
pub(crate) fn tensor_ptr(t: &candle_core::Tensor, stream: &CudaStream) -> crate::error::Result<DevPtr> {
    use crate::error::Error;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else { return Err(Error::internal("expanse kernels: a CUDA launch was given a tensor off the GPU")) };
    if !layout.is_contiguous() {
        return Err(Error::internal(format!("expanse kernels: a tensor of shape {:?} is not contiguous", t.dims())));
    }
    Ok(storage_ptr(s, layout.start_offset(), stream)?)
}

/// [`super::decode_attention`] on CUDA: the same kernels as the decode step, on candle storage, with
/// the query's position passed from the host.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    d: &AttnDims,
    scale: f32,
    window: Option<usize>,
) -> Result<(CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let dev = &s1.device;
    let dt = s1.dtype();
    if s2.dtype() != dt || s3.dtype() != dt {
        bail!("decode_attention: dtype mismatch");
    }
    let k = CudaKernels::load(dev, dt, d.head_dim)?;
    let stream = k.stream().clone();
    let bh = d.b * d.n_heads;
    let splits = super::attention_splits(d.kv_end - d.kv_start, bh);
    let n = bh * d.head_dim;
    let out = match dt {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(n)?, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<bf16>(n)?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f16>(n)?, dev.clone()),
        dt => bail!("decode_attention: unsupported dtype {dt:?}"),
    };
    let partial = dev.alloc_zeros::<f32>(if splits > 1 { bh * splits * (d.head_dim + 2) } else { 1 })?;
    let out_ptr = storage_ptr(&out, 0, &stream)?;
    let (partial_ptr, _p) = partial.device_ptr(&stream);
    let launch = AttnLaunch {
        q: storage_ptr(s1, l1.start_offset(), &stream)?,
        k: storage_ptr(s2, l2.start_offset(), &stream)?,
        v: storage_ptr(s3, l3.start_offset(), &stream)?,
        out: out_ptr,
        partial: partial_ptr,
        state: 0,
        kv_len: d.kv_end,
        window: window.unwrap_or(0),
        splits,
        scale,
        dims: *d,
    };
    k.attention(&launch)?;
    if splits > 1 {
        k.attention_combine(partial_ptr, out_ptr, d, splits)?;
    }
    drop(_p);
    Ok((out, d.out_shape()))
}
