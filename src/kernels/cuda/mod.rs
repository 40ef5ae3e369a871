//! The CUDA executor of expanse's kernels: loads the PTX that build.rs compiles from
//! kernels/cuda/*.cu and runs the launches that `super::launch` computes on a device's stream.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::launch::{self, Arg, AttnLaunch, DevPtr, Kernel, Launch, Launcher};
use super::AttnDims;

/// (module name in candle's per-device cache, PTX) of a kernel file (`Kernel::file`).
fn module(file: &str) -> Result<(&'static str, &'static str)> {
    Ok(match file {
        "residual_norm" => ("expanse_residual_norm", include_str!(concat!(env!("OUT_DIR"), "/residual_norm.ptx"))),
        "gemv" => ("expanse_gemv", include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"))),
        "rope_kv" => ("expanse_rope_kv", include_str!(concat!(env!("OUT_DIR"), "/rope_kv.ptx"))),
        "decode_attention" => ("expanse_decode_attention", include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"))),
        "argmax" => ("expanse_argmax", include_str!(concat!(env!("OUT_DIR"), "/argmax.ptx"))),
        "random_normal" => ("expanse_random_normal", include_str!(concat!(env!("OUT_DIR"), "/random_normal.ptx"))),
        f => bail!("expanse kernels: no PTX for {f}.cu"),
    })
}

fn load_function(dev: &CudaDevice, kernel: Kernel, dtype: DType, head_dim: usize) -> Result<CudaFunction> {
    let (mdl, ptx) = module(kernel.file())?;
    Ok(dev.get_or_load_custom_func(&kernel.name(dtype, head_dim)?, mdl, ptx)?.into_cuda_function())
}

/// Every kernel of one dtype, loaded for one device. Loading happens here, all at once, because a
/// module must not be loaded while a graph is being captured.
pub(crate) struct CudaKernels {
    stream: Arc<CudaStream>,
    functions: Vec<(Kernel, CudaFunction)>,
}

impl CudaKernels {
    pub(crate) fn load(dev: &CudaDevice, dtype: DType, head_dim: usize) -> Result<CudaKernels> {
        let functions = Kernel::ALL.iter().map(|&k| Ok((k, load_function(dev, k, dtype, head_dim)?))).collect::<Result<_>>()?;
        Ok(CudaKernels { stream: dev.cuda_stream(), functions })
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Launcher for CudaKernels {
    fn launch(&self, l: &Launch) -> Result<()> {
        let Some((_, func)) = self.functions.iter().find(|(k, _)| *k == l.kernel) else { bail!("expanse kernels: {:?} is not loaded", l.kernel) };
        launch_on(&self.stream, func, l)
    }
}

/// Pushes `l`'s arguments, typed as the kernel's parameters, and launches it on `stream`.
fn launch_on(stream: &CudaStream, func: &CudaFunction, l: &Launch) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: l.grid, block_dim: (l.block, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(func);
    for a in &l.args {
        match a {
            Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    // SAFETY: `launch` (the module) builds every argument list as its kernel declares it, and the
    // callers pass addresses of live device buffers of the sizes the kernel reads.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
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
/// (`expanse_random_normal_*`).
pub(crate) fn random_normal(dev: &CudaDevice, dtype: DType, out: DevPtr, n: usize, seed: u64, mean: f32, std: f32) -> Result<()> {
    let func = load_function(dev, Kernel::RandomNormal, dtype, 0)?;
    launch_on(&dev.cuda_stream(), &func, &launch::random_normal(out, n, seed, mean, std))
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
    let attn = AttnLaunch {
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
    k.launch(&launch::attention(&attn)?)?;
    if splits > 1 {
        k.launch(&launch::attention_combine(partial_ptr, out_ptr, d, splits)?)?;
    }
    drop(_p);
    Ok((out, d.out_shape()))
}
