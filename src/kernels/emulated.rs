//! The executor of `kernels/cuda` on the CPU emulator (tests only): launches from `launch` run the
//! CUDA sources compiled as host C++ (`kernels/cuda-emulator`), on CPU tensors addressed in place.

use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor};
use expanse_cuda_emulator::{arg, guard, Schedule};

use super::launch::{Arg, DevPtr, Launch, Launcher};

/// The kernels of one dtype (and head dimension, for attention) under one block/thread order.
pub(crate) struct EmulatedKernels {
    pub dtype: DType,
    pub head_dim: usize,
    pub schedule: Schedule,
}

impl Launcher for EmulatedKernels {
    fn launch(&self, l: &Launch) -> Result<()> {
        let args: Vec<_> = l
            .args
            .iter()
            .map(|a| match a {
                Arg::Ptr(v) | Arg::U64(v) => arg(v),
                Arg::I32(v) => arg(v),
                Arg::I64(v) => arg(v),
                Arg::F32(v) => arg(v),
            })
            .collect();
        let name = l.kernel.name(self.dtype, self.head_dim)?;
        // Inside a guard scope every buffer must be guarded, or the check would pass unseen (a null
        // pointer is an absent optional input, which the kernel does not read).
        if guard::in_scope() {
            if let Some(i) = l.args.iter().position(|a| matches!(a, Arg::Ptr(p) if *p != 0 && !guard::guarded(*p as usize))) {
                bail!("{name}: argument {i} ({:?}) addresses memory the guard does not cover (allocated outside guard::scope, on another thread, or past the guard's range)", l.args[i]);
            }
        }
        let (grid, block) = ([l.grid.0, l.grid.1, l.grid.2], [l.block, 1, 1]);
        // SAFETY: `launch` built the argument list for this kernel (count and sizes checked by the
        // emulator); buffer arguments are `host_ptr`s of live CPU tensors of the sizes it reads.
        unsafe { expanse_cuda_emulator::launch(&name, grid, block, &args, self.schedule) }.map_err(candle_core::Error::Msg)
    }
}

/// The address of a contiguous CPU tensor's first element, which emulated kernels read and write in
/// place: callers own the tensor and hold no borrow of its storage while a launch runs.
pub(crate) fn host_ptr(t: &Tensor) -> Result<DevPtr> {
    if !t.is_contiguous() {
        bail!("emulated kernels: a tensor of shape {:?} is not contiguous", t.dims());
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else { bail!("emulated kernels: a tensor off the CPU") };
    let base = match s {
        CpuStorage::F32(v) => v.as_ptr() as DevPtr,
        CpuStorage::BF16(v) => v.as_ptr() as DevPtr,
        CpuStorage::F16(v) => v.as_ptr() as DevPtr,
        CpuStorage::U32(v) => v.as_ptr() as DevPtr,
        CpuStorage::U8(v) => v.as_ptr() as DevPtr,
        _ => bail!("emulated kernels: no kernel takes {:?}", t.dtype()),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as DevPtr)
}
