//! Runs expanse's CUDA kernels (`kernels/cuda/*.cu`, compiled as host C++) on the CPU with CUDA's
//! execution model: blocks in turn, threads as fibers that meet at `__syncthreads` and
//! `__shfl_xor_sync`. Test tooling: it proves what the kernel bodies compute and that they need
//! no particular thread or block order. Under `guard::scope` (or `scope_front`), an access past a
//! buffer's end (before its start) or into a freed buffer faults and is named (`guard`); timing and
//! the device's own memory model need a GPU.

pub mod guard;

use std::ffi::{c_char, c_void, CString};

extern "C" {
    #[allow(clippy::too_many_arguments)] // the C function's parameters (emu.cpp)
    fn expanse_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *const *mut c_void,
        sizes: *const usize,
        n_args: usize,
        schedule: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// The order in which a launch runs its blocks and each block's threads (between barriers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Block 0 first, thread 0 first.
    Forward,
    /// Last block first, last thread first.
    Reverse,
    /// A permutation drawn from the seed.
    Shuffled(u64),
}

impl Schedule {
    fn code(self) -> u64 {
        match self {
            Schedule::Forward => 0,
            Schedule::Reverse => 1,
            Schedule::Shuffled(s) => s.max(2),
        }
    }
}

/// One launch argument: the address of its value and the value's size in bytes (as
/// `cuLaunchKernel` takes them).
pub type Arg = (*const c_void, usize);

/// The launch argument for the value `v`.
pub fn arg<T>(v: &T) -> Arg {
    (v as *const T as *const c_void, std::mem::size_of::<T>())
}

/// Runs kernel `name` over `grid` blocks of `block` threads.
///
/// # Safety
/// `args` must be the kernel's parameter list (count and sizes are checked, types are not), every
/// pointer argument addressing host memory that holds what the kernel reads and writes there.
pub unsafe fn launch(name: &str, grid: [u32; 3], block: [u32; 3], args: &[Arg], schedule: Schedule) -> Result<(), String> {
    let cname = CString::new(name).map_err(|_| format!("kernel name {name:?} contains NUL"))?;
    let ptrs: Vec<*mut c_void> = args.iter().map(|a| a.0 as *mut c_void).collect();
    let sizes: Vec<usize> = args.iter().map(|a| a.1).collect();
    let mut err = vec![0u8; 512];
    // SAFETY: the strings and arrays live across the call; the caller vouches for the arguments.
    let rc = unsafe {
        expanse_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            ptrs.as_ptr(),
            sizes.as_ptr(),
            args.len(),
            schedule.code(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(String::from_utf8_lossy(&err[..end]).into_owned())
}
