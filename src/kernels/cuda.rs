//! CUDA launches of the PTX that build.rs compiles from kernels/cuda/*.cu.

use super::{add_rms_norm_dims, add_rms_norm_out_shape, contiguous_range, AttnDims, MAX_HEAD_DIM};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

const SILU_MUL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/silu_mul.ptx"));
const ADD_RMS_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/add_rms_norm.ptx"));
const DECODE_ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));

// Module names in candle's per-device custom-module cache (must be unique).
const SILU_MUL_MOD: &str = "expanse_silu_mul";
const ADD_RMS_NORM_MOD: &str = "expanse_add_rms_norm";
const DECODE_ATTENTION_MOD: &str = "expanse_decode_attention";

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => bail!("expanse kernels: unsupported dtype {dt:?}"),
    })
}

fn check_dtypes(op: &str, ss: &[&CudaStorage]) -> Result<DType> {
    use candle_core::backend::BackendStorage;
    let dt = ss[0].dtype();
    if ss.iter().any(|s| s.dtype() != dt) {
        bail!("{op}: dtype mismatch");
    }
    Ok(dt)
}

fn i32_arg(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} does not fit in i32")))
}

fn i64_arg(v: usize) -> i64 {
    v as i64
}

// ---------------------------------------------------------------------------

pub(crate) fn silu_mul(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
    let dt = check_dtypes("silu_mul", &[s1, s2])?;
    let (a0, a1) = contiguous_range("silu_mul", "gate", l1)?;
    let (b0, b1) = contiguous_range("silu_mul", "up", l2)?;
    if a1 - a0 != b1 - b0 {
        bail!("silu_mul: element count mismatch");
    }
    let dev = &s1.device;
    let name = format!("expanse_silu_mul_{}", suffix(dt)?);

    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        s1: &CudaStorage,
        r1: (usize, usize),
        s2: &CudaStorage,
        r2: (usize, usize),
    ) -> Result<CudaStorage> {
        let g = s1.as_cuda_slice::<T>()?.slice(r1.0..r1.1);
        let u = s2.as_cuda_slice::<T>()?.slice(r2.0..r2.1);
        let n = r1.1 - r1.0;
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(name, SILU_MUL_MOD, SILU_MUL_PTX)?;
        const THREADS: u32 = 256;
        let blocks = n.div_ceil(THREADS as usize).min(65_535 * 8) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&g);
        b.arg(&u);
        b.arg(&mut out);
        b.arg(&n);
        // SAFETY: argument list matches `expanse_silu_mul_*` in kernels/cuda/silu_mul.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    let out = match dt {
        DType::F32 => run::<f32>(dev, &name, s1, (a0, a1), s2, (b0, b1))?,
        DType::BF16 => run::<bf16>(dev, &name, s1, (a0, a1), s2, (b0, b1))?,
        DType::F16 => run::<f16>(dev, &name, s1, (a0, a1), s2, (b0, b1))?,
        dt => bail!("silu_mul: unsupported dtype {dt:?}"),
    };
    Ok((out, l1.shape().clone()))
}

// ---------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dt = check_dtypes("add_rms_norm", &[s1, s2, s3])?;
    let (rows, cols) = add_rms_norm_dims(l1, l2, l3)?;
    let rx = contiguous_range("add_rms_norm", "x", l1)?;
    let rr = contiguous_range("add_rms_norm", "residual", l2)?;
    let rw = contiguous_range("add_rms_norm", "weight", l3)?;
    let dev = &s1.device;
    let name = format!("expanse_add_rms_norm_{}", suffix(dt)?);
    let rows_i = i32_arg("rows", rows)?;
    let cols_i = i32_arg("cols", cols)?;

    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        ss: [&CudaStorage; 3],
        rs: [(usize, usize); 3],
        rows: i32,
        cols: i32,
        eps: f32,
    ) -> Result<CudaStorage> {
        let x = ss[0].as_cuda_slice::<T>()?.slice(rs[0].0..rs[0].1);
        let r = ss[1].as_cuda_slice::<T>()?.slice(rs[1].0..rs[1].1);
        let w = ss[2].as_cuda_slice::<T>()?.slice(rs[2].0..rs[2].1);
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(2 * rows as usize * cols as usize)? };
        let func = dev.get_or_load_custom_func(name, ADD_RMS_NORM_MOD, ADD_RMS_NORM_PTX)?;
        // One block per row; block size a multiple of 32 (block_sum), <= 1024.
        let threads = (cols as u32).next_multiple_of(32).clamp(32, 1024);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&r);
        b.arg(&w);
        b.arg(&mut out);
        b.arg(&rows);
        b.arg(&cols);
        b.arg(&eps);
        // SAFETY: argument list matches `expanse_add_rms_norm_*` in kernels/cuda/add_rms_norm.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    let ss = [s1, s2, s3];
    let rs = [rx, rr, rw];
    let out = match dt {
        DType::F32 => run::<f32>(dev, &name, ss, rs, rows_i, cols_i, eps)?,
        DType::BF16 => run::<bf16>(dev, &name, ss, rs, rows_i, cols_i, eps)?,
        DType::F16 => run::<f16>(dev, &name, ss, rs, rows_i, cols_i, eps)?,
        dt => bail!("add_rms_norm: unsupported dtype {dt:?}"),
    };
    Ok((out, add_rms_norm_out_shape(l1)))
}

// ---------------------------------------------------------------------------

/// Blocks the split-KV kernel aims for (a few per SM on an H100/H200).
const TARGET_BLOCKS: usize = 512;
/// Fewest keys a split handles (below that the combine pass costs more than it saves).
const MIN_KEYS_PER_SPLIT: usize = 64;
const WARPS: u32 = 4;

/// `(n_splits, chunk)` with every split non-empty.
pub(crate) fn attention_splits(n_keys: usize, bh: usize) -> (usize, usize) {
    let max_by_occupancy = TARGET_BLOCKS.div_ceil(bh.max(1)).max(1);
    let max_by_len = n_keys.div_ceil(MIN_KEYS_PER_SPLIT).max(1);
    let splits = max_by_occupancy.min(max_by_len).min(65_535);
    let chunk = n_keys.div_ceil(splits);
    (n_keys.div_ceil(chunk), chunk)
}

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
) -> Result<(CudaStorage, Shape)> {
    let dt = check_dtypes("decode_attention", &[s1, s2, s3])?;
    if d.head_dim > MAX_HEAD_DIM {
        bail!("decode_attention: head_dim {} > {MAX_HEAD_DIM} is not supported on CUDA", d.head_dim);
    }
    if d.b > 65_535 {
        bail!("decode_attention: batch {} too large", d.b);
    }
    let variant = match d.head_dim {
        0..=64 => "d64",
        65..=128 => "d128",
        _ => "d256",
    };
    let sfx = suffix(dt)?;
    let partial_name = format!("expanse_decode_attn_{sfx}_{variant}");
    let combine_name = format!("expanse_decode_attn_combine_{sfx}");
    let offsets = [l1.start_offset(), l2.start_offset(), l3.start_offset()];
    let dev = &s1.device;

    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        names: (&str, &str),
        ss: [&CudaStorage; 3],
        offsets: [usize; 3],
        d: &AttnDims,
        scale: f32,
    ) -> Result<CudaStorage> {
        let q = ss[0].as_cuda_slice::<T>()?.slice(offsets[0]..);
        let k = ss[1].as_cuda_slice::<T>()?.slice(offsets[1]..);
        let v = ss[2].as_cuda_slice::<T>()?.slice(offsets[2]..);
        let bh = d.b * d.n_heads;
        let n_keys = d.kv_end - d.kv_start;
        let (n_splits, chunk) = attention_splits(n_keys, bh);
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(bh * d.head_dim)? };
        // With one split the first kernel writes `out` directly and never touches
        // `partial`; cudarc needs a valid pointer anyway, so allocate one float.
        let partial_len = if n_splits > 1 { bh * n_splits * (d.head_dim + 2) } else { 1 };
        let mut partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(partial_len)? };

        let n_heads = i32_arg("n_heads", d.n_heads)?;
        let n_kv_heads = i32_arg("n_kv_heads", d.n_kv_heads)?;
        let head_dim = i32_arg("head_dim", d.head_dim)?;
        let strides = [d.q_sb, d.q_sh, d.k_sb, d.k_sh, d.k_ss, d.v_sb, d.v_sh, d.v_ss].map(i64_arg);
        let kv_start = i32_arg("kv_start", d.kv_start)?;
        let kv_end = i32_arg("kv_len", d.kv_end)?;
        let chunk_i = i32_arg("chunk", chunk)?;

        let func = dev.get_or_load_custom_func(names.0, DECODE_ATTENTION_MOD, DECODE_ATTENTION_PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (d.n_heads as u32, n_splits as u32, d.b as u32),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&mut out);
        b.arg(&mut partial);
        b.arg(&n_heads);
        b.arg(&n_kv_heads);
        b.arg(&head_dim);
        for s in &strides {
            b.arg(s);
        }
        b.arg(&kv_start);
        b.arg(&kv_end);
        b.arg(&chunk_i);
        b.arg(&scale);
        // SAFETY: argument list matches DECODE_ATTN_PARTIAL in kernels/cuda/decode_attention.cu.
        unsafe { b.launch(cfg) }.w()?;

        if n_splits > 1 {
            let n_splits_i = i32_arg("n_splits", n_splits)?;
            let func = dev.get_or_load_custom_func(names.1, DECODE_ATTENTION_MOD, DECODE_ATTENTION_PTX)?;
            let threads = (d.head_dim as u32).next_multiple_of(32).clamp(32, 256);
            let cfg = LaunchConfig {
                grid_dim: (d.n_heads as u32, 1, d.b as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&partial);
            b.arg(&mut out);
            b.arg(&n_heads);
            b.arg(&head_dim);
            b.arg(&n_splits_i);
            // SAFETY: argument list matches DECODE_ATTN_COMBINE in kernels/cuda/decode_attention.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    let names = (partial_name.as_str(), combine_name.as_str());
    let ss = [s1, s2, s3];
    let out = match dt {
        DType::F32 => run::<f32>(dev, names, ss, offsets, d, scale)?,
        DType::BF16 => run::<bf16>(dev, names, ss, offsets, d, scale)?,
        DType::F16 => run::<f16>(dev, names, ss, offsets, d, scale)?,
        dt => bail!("decode_attention: unsupported dtype {dt:?}"),
    };
    Ok((out, d.out_shape()))
}
