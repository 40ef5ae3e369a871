//! The CUDA kernels' sources run on the CPU emulator (`kernels/cuda-emulator`) through the cases of
//! `cuda_kernels`, in every test run: what the kernel bodies compute, with the launches the decode
//! step makes, under three orders of blocks and threads (a result that depends on the order is a
//! missing barrier or a race between blocks). Memory errors and speed need a GPU (gpu-check).

use super::cuda_kernels::{self as cases, Target};
use super::*;
use crate::kernels::emulated::{host_ptr, EmulatedKernels};
use crate::kernels::launch::DevPtr;
use expanse_cuda_emulator::{arg, Schedule};

struct Emulated(Schedule);

impl Target for Emulated {
    type K = EmulatedKernels;

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn kernels(&self, dtype: DType, head_dim: usize) -> EmulatedKernels {
        EmulatedKernels { dtype, head_dim, schedule: self.0 }
    }

    fn ptr(&self, t: &Tensor) -> DevPtr {
        host_ptr(t).unwrap()
    }

    fn upload(&self, t: &Tensor) -> Tensor {
        t.copy().unwrap()
    }

    fn full_size(&self) -> bool {
        false
    }
}

/// Forward, reverse, and a shuffled order drawn fresh (printed, like the inputs' seed).
fn schedules(test: &str) -> [Emulated; 3] {
    let seed = rng(&format!("{test} schedule")).random::<u64>();
    [Emulated(Schedule::Forward), Emulated(Schedule::Reverse), Emulated(Schedule::Shuffled(seed))]
}

#[test]
fn gemv_emulated_matches_cpu() {
    schedules("gemv").iter().for_each(cases::gemv);
}

#[test]
fn gemv_silu_mul_emulated_matches_cpu() {
    schedules("gemv_silu_mul").iter().for_each(cases::gemv_silu_mul);
}

#[test]
fn residual_norm_emulated_matches_cpu() {
    schedules("residual_norm").iter().for_each(cases::residual_norm);
}

#[test]
fn rope_kv_emulated_matches_cpu_bit_for_bit() {
    schedules("rope_kv").iter().for_each(cases::rope_kv_bit_for_bit);
}

#[test]
fn argmax_emulated_matches_cpu_ties_included() {
    schedules("argmax").iter().for_each(cases::argmax_ties_included);
}

#[test]
fn decode_attention_emulated_matches_cpu() {
    schedules("decode_attention").iter().for_each(cases::decode_attention_launches);
}

#[test]
fn step_attention_emulated_reads_its_length_from_device_state() {
    schedules("step_attention").iter().for_each(cases::step_attention_reads_its_length_from_device_state);
}

#[test]
fn random_normal_emulated_matches_cpu() {
    schedules("random_normal").iter().for_each(cases::random_normal);
}

/// The emulator holds launches to the kernels' parameter lists, as `cuLaunchKernel` would not.
#[test]
fn the_emulator_checks_argument_lists() {
    let (p, n) = (0u64, 5i32);
    let run = |args: &[expanse_cuda_emulator::Arg], name: &str| unsafe { expanse_cuda_emulator::launch(name, [1, 1, 1], [32, 1, 1], args, Schedule::Forward) };
    assert!(run(&[arg(&p), arg(&p), arg(&p), arg(&n)], "expanse_gemv_f32").unwrap_err().contains("4 arguments given, 5 expected"));
    assert!(run(&[arg(&p), arg(&p), arg(&p), arg(&n), arg(&p)], "expanse_gemv_f32").unwrap_err().contains("argument 4 is 8 bytes, the kernel takes 4"));
    assert!(run(&[], "expanse_nothing").unwrap_err().contains("no kernel named expanse_nothing"));
    // Every kernel `launch` names exists in the sources, for every dtype and head-dim variant.
    for k in crate::kernels::launch::Kernel::ALL {
        for dtype in DTYPES {
            for d in [64, 128, 256] {
                let name = k.name(dtype, d).unwrap();
                assert!(!run(&[], &name).unwrap_err().contains("no kernel named"), "{name}");
            }
        }
    }
}

/// A warp-shuffle sum over half a warp is undefined on a GPU: the emulator refuses it (and runs the
/// same launch with a whole warp).
#[test]
fn the_emulator_refuses_partial_warps() {
    let (x, mut y) = ([1f32; 16], [0f32; 1]);
    let (xp, yp) = (x.as_ptr() as u64, y.as_mut_ptr() as u64);
    let (rows, cols) = (1i32, 16i32);
    let args = [arg(&xp), arg(&xp), arg(&yp), arg(&rows), arg(&cols)];
    let e = unsafe { expanse_cuda_emulator::launch("expanse_gemv_f32", [1, 1, 1], [16, 1, 1], &args, Schedule::Forward) };
    assert!(e.unwrap_err().contains("16 of 32 lanes"));
    let e = unsafe { expanse_cuda_emulator::launch("expanse_gemv_f32", [1, 1, 1], [32, 1, 1], &args, Schedule::Reverse) };
    assert_eq!(e, Ok(()));
    assert_eq!(y[0], 16.0, "16 ones summed over the warp");
}
