//! The CUDA executor of expanse's kernels: loads the fatbins that build.rs compiles from
//! kernels/cuda/*.cu (SASS for the target arch, so the driver JITs nothing on that card, plus PTX
//! for newer ones) and runs the launches that `super::launch` computes on a device's stream, with
//! programmatic dependent launch on Hopper and newer (see `launch_on`).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaStream, DevicePtr};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::launch::{self, Arg, AttnLaunch, DevPtr, Kernel, Launch, Launcher};
use super::AttnDims;

/// A fatbin embedded 16-byte aligned (cuModuleLoadData reads its headers in place).
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);

macro_rules! fatbin {
    ($stem:literal) => {{
        static IMAGE: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".fatbin")));
        &IMAGE.0
    }};
}

/// The fatbin of a kernel file (`Kernel::file`).
fn image(file: &str) -> Result<&'static [u8]> {
    Ok(match file {
        "residual_norm" => fatbin!("residual_norm"),
        "gemv" => fatbin!("gemv"),
        "gemv_quant" => fatbin!("gemv_quant"),
        "rope_kv" => fatbin!("rope_kv"),
        "decode_attention" => fatbin!("decode_attention"),
        "argmax" => fatbin!("argmax"),
        "random_normal" => fatbin!("random_normal"),
        f => bail!("expanse kernels: no fatbin for {f}.cu"),
    })
}

/// Modules loaded per (context, file), kept for the process's life (as candle keeps its own): a
/// module must not be loaded while a graph is being captured, so each loads once, before.
fn module(dev: &CudaDevice, file: &'static str) -> Result<sys::CUmodule> {
    static MODULES: OnceLock<Mutex<HashMap<(usize, &'static str), usize>>> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let key = (ctx.cu_ctx() as usize, file);
    let mut modules = MODULES.get_or_init(Default::default).lock().map_err(|_| candle_core::Error::Msg("expanse kernels: module cache poisoned".into()))?;
    if let Some(&m) = modules.get(&key) {
        return Ok(m as sys::CUmodule);
    }
    let img = image(file)?;
    ctx.bind_to_thread().w()?;
    // SAFETY: `img` is a whole fatbin made by nvcc (build.rs), 16-byte aligned, alive forever.
    let m = unsafe { result::module::load_data(img.as_ptr() as *const c_void) }.map_err(|e| {
        candle_core::Error::Msg(format!(
            "expanse kernels: loading {file}.fatbin failed ({e}); it holds SASS for the CUDA_COMPUTE_CAP it was built with and PTX of that arch for newer GPUs: rebuild with CUDA_COMPUTE_CAP set to this GPU's (README, GPU builds)"
        ))
    })?;
    modules.insert(key, m as usize);
    Ok(m)
}

fn load_function(dev: &CudaDevice, kernel: Kernel, dtype: DType, head_dim: usize) -> Result<sys::CUfunction> {
    let m = module(dev, kernel.file())?;
    let name = kernel.name(dtype, head_dim)?;
    let cname = CString::new(name.clone()).map_err(|_| candle_core::Error::Msg(format!("kernel name {name:?}")))?;
    // SAFETY: `m` is a loaded module that is never unloaded.
    unsafe { result::module::get_function(m, cname) }.map_err(|e| candle_core::Error::Msg(format!("expanse kernels: {name}: {e}")))
}

/// Whether launches on `dev` carry programmatic dependent launch (compute capability 9.0 and
/// newer, unless `EXPANSE_PDL=0`): a kernel may then start while the previous one drains, and
/// waits (`pdl_wait` in common.cuh) before it touches memory.
fn use_pdl(dev: &CudaDevice) -> bool {
    if std::env::var("EXPANSE_PDL").is_ok_and(|v| v == "0") {
        return false;
    }
    let major = dev.cuda_stream().context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    major.is_ok_and(|m| m >= 9)
}

/// Every kernel of one dtype, loaded for one device. Loading happens here, all at once, because a
/// module must not be loaded while a graph is being captured.
pub(crate) struct CudaKernels {
    stream: Arc<CudaStream>,
    functions: Vec<(Kernel, usize)>,
    pdl: bool,
}

impl CudaKernels {
    pub(crate) fn load(dev: &CudaDevice, dtype: DType, head_dim: usize) -> Result<CudaKernels> {
        let functions = Kernel::all().into_iter().map(|k| Ok((k, load_function(dev, k, dtype, head_dim)? as usize))).collect::<Result<_>>()?;
        Ok(CudaKernels { stream: dev.cuda_stream(), functions, pdl: use_pdl(dev) })
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Launcher for CudaKernels {
    fn launch(&self, l: &Launch) -> Result<()> {
        let Some(&(_, func)) = self.functions.iter().find(|(k, _)| *k == l.kernel) else { bail!("expanse kernels: {:?} is not loaded", l.kernel) };
        launch_on(&self.stream, func as sys::CUfunction, l, self.pdl)
    }
}

/// Launches `l` on `stream` with `cuLaunchKernelEx`, its arguments typed as the kernel's
/// parameters. With `pdl` the launch allows programmatic stream serialization: it is recorded the
/// same way into a captured graph (a programmatic edge), and every kernel's `pdl_wait()` keeps it
/// from touching memory before the previous kernel has finished.
fn launch_on(stream: &CudaStream, func: sys::CUfunction, l: &Launch, pdl: bool) -> Result<()> {
    // The values the kernel parameters point to, 8 bytes each (the widest argument).
    let mut values: Vec<u64> = l
        .args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(v) | Arg::U64(v) => v,
            Arg::I32(v) => v as u32 as u64,
            Arg::I64(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
        })
        .collect();
    // Little-endian: a 4-byte parameter read at its value's address is the low half.
    let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
    // SAFETY: plain C data; the union's field is the one the attribute's id names.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: l.grid.0,
        gridDimY: l.grid.1,
        gridDimZ: l.grid.2,
        blockDimX: l.block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    stream.context().bind_to_thread().w()?;
    // SAFETY: `launch` (the module) builds every argument list as its kernel declares it (the
    // emulator checks count and sizes), each value lives in `values` across the call, and the
    // callers pass addresses of live device buffers of the sizes the kernel reads.
    unsafe { sys::cuLaunchKernelEx(&cfg, func, params.as_mut_ptr(), std::ptr::null_mut()) }.result().w()?;
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
        DType::U8 => ptr::<u8>(s, offset, stream),
        dt => bail!("expanse kernels: unsupported dtype {dt:?}"),
    }
}

/// `out[i] = mean + std · normal(seed, i)` for the `n` elements of `out` on `dev`
/// (`expanse_random_normal_*`).
pub(crate) fn random_normal(dev: &CudaDevice, dtype: DType, out: DevPtr, n: usize, seed: u64, mean: f32, std: f32) -> Result<()> {
    let func = load_function(dev, Kernel::RandomNormal, dtype, 0)?;
    launch_on(&dev.cuda_stream(), func, &launch::random_normal(out, n, seed, mean, std), use_pdl(dev))
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
#[allow(clippy::too_many_arguments)] // a CustomOp3's three (storage, layout) operands, and the op's parameters
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
    let splits = launch::attention_splits(d.kv_end - d.kv_start, launch::attention_blocks_per_split(d.b, d.n_heads, d.n_kv_heads));
    let n = bh * d.head_dim;
    let out = match dt {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(n)?, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<bf16>(n)?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f16>(n)?, dev.clone()),
        dt => bail!("decode_attention: unsupported dtype {dt:?}"),
    };
    let partial = dev.alloc_zeros::<f32>(launch::attention_scratch_words(d, splits))?;
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
        scratch_batch: d.b,
    };
    k.launch(&launch::attention(&attn)?)?;
    drop(_p);
    Ok((out, d.out_shape()))
}
