//! Choosing the compute device from `--device`, and the only place that knows which backends were built.

use std::ffi::OsStr;
use std::path::Path;

use candle_core::{DType, Device, DeviceLocation, Tensor};

use crate::error::{Error, Result};

/// The device `--device` chose, with what the user should hear about that choice (once).
pub struct Choice {
    pub device: Device,
    /// Why `auto` fell back to the CPU, or that this build leaves the machine's GPU unused.
    pub notice: Option<String>,
}

/// Parses `--device auto|cpu|cuda[:N]|metal[:N]`. `auto` picks CUDA, then Metal, then the CPU.
pub fn select(spec: &str) -> Result<Choice> {
    // Every device runs some CPU kernels (the CPU one all of them): a bad EXPANSE_CPU fails here.
    crate::kernels::cpu::tier::check_env().map_err(|e| Error::flag("EXPANSE_CPU", e))?;
    crate::kernels::cpu::tier::check_cores_env().map_err(|e| Error::flag("EXPANSE_CORES", e))?;
    let (kind, ordinal) = match spec.split_once(':') {
        // One CPU, and `auto` picks its own: an ordinal there would be silently ignored.
        Some((k @ ("cpu" | "auto"), _)) => return Err(Error::flag("--device", format!("`{spec}`: `{k}` takes no ordinal (cuda:N and metal:N do)"))),
        Some((k, n)) => {
            let n: usize = n.parse().map_err(|_| Error::flag("--device", format!("`{spec}`: expected an ordinal after `:`")))?;
            (k, n)
        }
        None => (spec, 0),
    };
    let chosen = |device| Ok(Choice { device, notice: None });
    match kind {
        "cpu" => chosen(Device::Cpu),
        "cuda" => chosen(cuda(ordinal).map_err(|e| Error::flag("--device", e))?),
        "metal" => chosen(metal(ordinal).map_err(|e| Error::flag("--device", e))?),
        "auto" => Ok(auto()),
        _ => Err(Error::flag("--device", format!("`{spec}`: expected auto, cpu, cuda[:N] or metal[:N]"))),
    }
}

/// `--device auto`: the first GPU backend this binary was built with that starts, else the CPU — with
/// one line saying why a built-in backend did not start, or that the machine's GPU goes unused.
fn auto() -> Choice {
    let mut failures = Vec::new();
    for (built, open) in [(cfg!(feature = "cuda"), cuda as fn(usize) -> std::result::Result<Device, String>), (cfg!(feature = "metal"), metal)] {
        if built {
            match open(0) {
                Ok(device) => return Choice { device, notice: None },
                Err(e) => failures.push(e),
            }
        }
    }
    let notice = if failures.is_empty() {
        unused_gpu_hint(nvidia_gpu_present(Path::new("/"), std::env::var_os("PATH").as_deref()), cfg!(all(target_os = "macos", target_arch = "aarch64")))
    } else {
        Some(format!("--device auto: {}; running on the CPU", failures.join("; ")))
    };
    Choice { device: Device::Cpu, notice }
}

/// A CUDA device on a stream of its own (CUDA graphs cannot capture the legacy default stream), with
/// cudarc's cross-stream event tracking off: expanse uses that one stream, and events recorded on
/// tensors would break the decode step's graph capture.
#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> std::result::Result<Device, String> {
    let dev =
        candle_core::CudaDevice::new_with_stream(ordinal).map_err(|e| format!("cuda:{ordinal} failed to initialise ({})", crate::error::candle_message(&e)))?;
    // SAFETY: everything expanse runs on this device goes through its one stream, so no tensor is
    // used on another stream, which is what event tracking would order.
    unsafe { dev.disable_event_tracking() };
    let device = Device::Cuda(dev);
    // What the device had in use before this process allocated anything (its context included).
    if let Some(used) = gpu_memory_used(&device) {
        let _ = GPU_BASELINE.set(used);
    }
    Ok(device)
}

/// Device-wide GPU memory in use right after the first CUDA device was set up.
#[cfg(feature = "cuda")]
static GPU_BASELINE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Bytes this process has allocated on the GPU since it set the device up: device-wide use now less
/// use then (the CUDA context and other processes' memory stay out, as long as they do not change).
#[cfg(feature = "cuda")]
pub fn gpu_memory_allocated(device: &Device) -> Option<u64> {
    Some(gpu_memory_used(device)?.saturating_sub(*GPU_BASELINE.get()?))
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_memory_allocated(_device: &Device) -> Option<u64> {
    None
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> std::result::Result<Device, String> {
    Err("this binary was built without CUDA; rebuild with `--features cuda`".into())
}

#[cfg(feature = "metal")]
fn metal(ordinal: usize) -> std::result::Result<Device, String> {
    // candle picks the device by indexing this same list, and panics past its end.
    let count = candle_metal_kernels::metal::Device::all().len();
    if ordinal >= count {
        return Err(format!("metal:{ordinal}: this machine has {count} Metal device(s)"));
    }
    Device::new_metal(ordinal).map_err(|e| format!("metal:{ordinal} failed to initialise ({})", crate::error::candle_message(&e)))
}

#[cfg(not(feature = "metal"))]
fn metal(_: usize) -> std::result::Result<Device, String> {
    Err("this binary was built without Metal; rebuild with `--features metal`".into())
}

/// Whether the NVIDIA driver is visible under `root` (its /proc entry or a device node), or
/// `nvidia-smi` is on `path`.
fn nvidia_gpu_present(root: &Path, path: Option<&OsStr>) -> bool {
    root.join("proc/driver/nvidia/version").exists()
        || root.join("dev/nvidia0").exists()
        || path.is_some_and(|p| std::env::split_paths(p).any(|dir| dir.join("nvidia-smi").is_file()))
}

/// The line a build without the machine's GPU backend owes the user when it falls back to the CPU.
fn unused_gpu_hint(nvidia: bool, apple_silicon: bool) -> Option<String> {
    if nvidia && !cfg!(feature = "cuda") {
        return Some(
            "note: this machine has an NVIDIA GPU, but this expanse was built without CUDA, so it runs on the CPU; \
             build with `cargo build --release --features cuda` (README: GPU builds)"
                .into(),
        );
    }
    if apple_silicon && !cfg!(feature = "metal") {
        return Some(
            "note: this Mac's GPU is unused: this expanse was built without Metal, so it runs on the CPU; \
             build with `cargo build --release --features metal`"
                .into(),
        );
    }
    None
}

/// A short name for reports: `cpu (N threads)`, `cuda:N`, `metal:N`, with the ordinal chosen.
pub fn name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { .. } => format!("metal:{}", metal_ordinal(device)),
    }
}

/// The ordinal of a Metal device: candle locates it by registry id, `--device metal:N` by index.
#[cfg(feature = "metal")]
fn metal_ordinal(device: &Device) -> usize {
    let Device::Metal(d) = device else { return 0 };
    let id = d.metal_device().registry_id();
    candle_metal_kernels::metal::Device::all().iter().position(|m| m.registry_id() == id).unwrap_or(0)
}

#[cfg(not(feature = "metal"))]
fn metal_ordinal(_: &Device) -> usize {
    0
}

/// Resolves `--dtype auto|bf16|f16|f32`. `auto`: bf16 on a GPU, the checkpoint's dtype on the CPU.
/// Returns the dtype and a note when the request had to change.
pub fn dtype(spec: &str, device: &Device, checkpoint: Option<DType>) -> Result<(DType, Option<String>)> {
    let wanted = match spec {
        "auto" => match device {
            Device::Cpu => checkpoint.unwrap_or(DType::F32),
            _ => DType::BF16,
        },
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f32" | "float32" => DType::F32,
        _ => return Err(Error::flag("--dtype", format!("`{spec}`: expected auto, bf16, f16 or f32"))),
    };
    Ok(metal_bf16_fallback(wanted, device.is_metal(), || runs_dtype(device, DType::BF16)))
}

/// On Metal, bf16 becomes f16 when the device cannot run bf16 (`bf16_runs` is asked only then).
fn metal_bf16_fallback(wanted: DType, metal: bool, bf16_runs: impl FnOnce() -> bool) -> (DType, Option<String>) {
    if metal && wanted == DType::BF16 && !bf16_runs() {
        return (DType::F16, Some("this Metal device cannot run bf16 (candle's bf16 kernels need Metal 3.1): running in f16".into()));
    }
    (wanted, None)
}

/// Whether `device` computes in `dtype`: a cast, a product and a matmul on exactly representable
/// values. candle compiles its Metal bf16 kernels only where the Metal compiler has `bfloat` (Metal
/// 3.1: macOS 14 on an Apple GPU); elsewhere the kernel is missing, the call fails and so does the probe.
pub fn runs_dtype(device: &Device, dtype: DType) -> bool {
    let probe = || -> candle_core::Result<bool> {
        let a = Tensor::new(&[[1.5f32, -2.0], [0.25, 4.0]], device)?.to_dtype(dtype)?;
        let p = a.matmul(&a)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(p == [[1.75, -11.0], [1.375, 15.5]])
    };
    probe().unwrap_or(false)
}

/// Waits for queued device work so a clock read measures it.
pub fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// The device's copy bandwidth in bytes per second, counting bytes read and written as STREAM does:
/// a 1 GiB device-to-device `cuMemcpyDtoDAsync`, timed over twenty runs after three warm-ups. None off
/// CUDA. (candle's own tensor copy is an element-wise kernel that reached a quarter of this on an H200,
/// 2026-12-04: the driver's copy is the ceiling a GEMV streaming weights is held to.)
#[cfg(feature = "cuda")]
pub fn copy_bandwidth(device: &Device) -> Result<Option<f64>> {
    let Device::Cuda(d) = device else { return Ok(None) };
    let stream = d.cuda_stream();
    let n = 1usize << 30; // bytes
    let driver = |e: candle_core::cuda_backend::cudarc::driver::DriverError| Error::Internal(format!("copy bandwidth probe: {e:?}"));
    // A device too full for 2 GiB beside the model leaves the figure out rather than the whole bench.
    let (Ok(src), Ok(mut dst)) = (stream.alloc_zeros::<u8>(n), stream.alloc_zeros::<u8>(n)) else { return Ok(None) };
    let (warmup, runs) = (3, 20);
    let mut start = std::time::Instant::now();
    for i in 0..warmup + runs {
        if i == warmup {
            stream.synchronize().map_err(driver)?;
            start = std::time::Instant::now();
        }
        stream.memcpy_dtod(&src, &mut dst).map_err(driver)?;
    }
    stream.synchronize().map_err(driver)?;
    let secs = start.elapsed().as_secs_f64().max(1e-12);
    Ok(Some((2 * n * runs) as f64 / secs))
}

#[cfg(not(feature = "cuda"))]
pub fn copy_bandwidth(_device: &Device) -> Result<Option<f64>> {
    Ok(None)
}

/// Bytes of GPU memory in use now (device-wide: total − free, as nvidia-smi counts it, so it includes
/// the CUDA context and other processes), where the backend can tell.
#[cfg(feature = "cuda")]
pub fn gpu_memory_used(device: &Device) -> Option<u64> {
    match device {
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_memory_used(_device: &Device) -> Option<u64> {
    None
}

/// The CUDA default memory pool's (reserved, in use) bytes. cudarc allocates stream-ordered
/// (`cuMemAllocAsync`), so memory freed during loading may stay reserved by the pool and count as
/// used device-wide: this tells that apart from memory still held (on an H200, 2026-12-04, it showed
/// the 1.1 GB then found beyond the weights after load reserved but free: `model::load` now assembles
/// weights on the host). None off CUDA or when the driver won't say.
#[cfg(feature = "cuda")]
pub fn gpu_pool_bytes(device: &Device) -> Option<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else { return None };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: the context is bound, `pool` is a valid out-pointer, and each attribute asked is a u64.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().ok()?;
    let attr = |a: sys::CUmemPool_attribute| {
        let mut v: u64 = 0;
        unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut std::ffi::c_void) }.result().ok().map(|_| v)
    };
    Some((attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?, attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?))
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_pool_bytes(_device: &Device) -> Option<(u64, u64)> {
    None
}

/// Bytes of memory the GPU has in all, where the backend can tell (a request beyond it can never fit).
#[cfg(feature = "cuda")]
pub fn gpu_memory_total(device: &Device) -> Option<u64> {
    match device {
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok().map(|(_, total)| total as u64),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_memory_total(_device: &Device) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_runs_every_dtype_the_cpu_has() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            assert!(runs_dtype(&Device::Cpu, dtype), "{dtype:?}");
        }
        // A dtype without a matmul fails the probe instead of answering yes.
        assert!(!runs_dtype(&Device::Cpu, DType::U8));
    }

    #[test]
    fn metal_falls_back_to_f16_only_when_bf16_does_not_run() {
        let (d, note) = metal_bf16_fallback(DType::BF16, true, || false);
        assert_eq!(d, DType::F16);
        assert!(note.is_some_and(|n| n.contains("f16")));
        assert_eq!(metal_bf16_fallback(DType::BF16, true, || true), (DType::BF16, None));
        assert_eq!(metal_bf16_fallback(DType::F32, true, || unreachable!("only bf16 is probed")), (DType::F32, None));
        assert_eq!(metal_bf16_fallback(DType::BF16, false, || unreachable!("only Metal is probed")), (DType::BF16, None));
    }

    #[test]
    fn an_nvidia_driver_or_nvidia_smi_counts_as_a_gpu() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let path = std::env::join_paths([&bin]).unwrap();
        assert!(!nvidia_gpu_present(root.path(), Some(&path)));
        std::fs::write(bin.join("nvidia-smi"), "").unwrap();
        assert!(nvidia_gpu_present(root.path(), Some(&path)));
        assert!(!nvidia_gpu_present(root.path(), None));
        std::fs::create_dir_all(root.path().join("proc/driver/nvidia")).unwrap();
        std::fs::write(root.path().join("proc/driver/nvidia/version"), "NVRM").unwrap();
        assert!(nvidia_gpu_present(root.path(), None));
    }

    #[test]
    fn the_unused_gpu_hint_names_the_build_flag() {
        assert_eq!(unused_gpu_hint(false, false), None);
        let nvidia = unused_gpu_hint(true, false);
        assert_eq!(nvidia.is_some(), !cfg!(feature = "cuda"));
        if let Some(n) = nvidia {
            assert!(n.contains("--features cuda") && !n.contains('\n'), "{n}");
        }
        let apple = unused_gpu_hint(false, true);
        assert_eq!(apple.is_some(), !cfg!(feature = "metal"));
        if let Some(n) = apple {
            assert!(n.contains("--features metal"), "{n}");
        }
    }

    #[test]
    fn device_names_carry_the_ordinal_and_bad_specs_name_the_flag() {
        assert!(name(&select("cpu").unwrap().device).starts_with("cpu ("));
        for bad in ["gpu", "cuda:x", "metal:-1"] {
            let e = select(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("--device"), "{bad}: {e}");
        }
        if !cfg!(feature = "cuda") {
            let e = select("cuda:1").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
