//! Choosing the compute device from `--device`, and the only place that knows which backends were built.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Parses `--device auto|cpu|cuda[:N]|metal[:N]`. `auto` picks CUDA, then Metal, then the CPU.
pub fn select(spec: &str) -> Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n: usize = n.parse().map_err(|_| Error::flag("--device", format!("`{spec}`: expected an ordinal after `:`")))?;
            (k, n)
        }
        None => (spec, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(ordinal),
        "metal" => metal(ordinal),
        "auto" => Ok(cuda(0).or_else(|_| metal(0)).unwrap_or(Device::Cpu)),
        _ => Err(Error::flag("--device", format!("`{spec}`: expected auto, cpu, cuda[:N] or metal"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::flag("--device", format!("cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<Device> {
    Err(Error::flag("--device", "this binary was built without CUDA; rebuild with `--features cuda`"))
}

#[cfg(feature = "metal")]
fn metal(ordinal: usize) -> Result<Device> {
    Device::new_metal(ordinal).map_err(|e| Error::flag("--device", format!("metal:{ordinal}: {e}")))
}

#[cfg(not(feature = "metal"))]
fn metal(_: usize) -> Result<Device> {
    Err(Error::flag("--device", "this binary was built without Metal; rebuild with `--features metal`"))
}

/// A short name for reports: `cpu`, `cuda:0`, `metal:0`.
pub fn name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => "cuda:0".into(),
        Device::Metal(_) => "metal:0".into(),
    }
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
    if matches!(device, Device::Metal(_)) && wanted == DType::BF16 && !metal_bf16() {
        return Ok((DType::F16, Some("this Metal device has no bf16 support: running in f16".into())));
    }
    Ok((wanted, None))
}

#[cfg(feature = "metal")]
fn metal_bf16() -> bool {
    // candle's Metal backend has bf16 kernels from Apple7 (M1) on; older GPUs fall back.
    true
}

#[cfg(not(feature = "metal"))]
fn metal_bf16() -> bool {
    false
}

/// Waits for queued device work so a clock read measures it.
pub fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
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
