//! The CUDA kernels' sources run on the CPU emulator (`kernels/cuda-emulator`) through the cases of
//! `cuda_kernels`, in every test run: what the kernel bodies compute, with the launches the decode
//! step makes, under three orders of blocks and threads (a result that depends on the order is a
//! missing barrier or a race between blocks), with the buffers between guard pages (an access out
//! of bounds faults, naming the kernel, block and thread). Speed needs a GPU (gpu-check).

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

/// Runs `case` under forward, reverse, and a shuffled order drawn fresh (printed, like the inputs'
/// seed), with every buffer the test allocates against a guard page: after its end, or before its
/// start in the reverse order's run.
fn run_case(test: &str, case: fn(&Emulated)) {
    let seed = rng(&format!("{test} schedule")).random::<u64>();
    for (schedule, front) in [(Schedule::Forward, false), (Schedule::Reverse, true), (Schedule::Shuffled(seed), false)] {
        let _guard = if front { crate::kernels::guard_buffers_front() } else { crate::kernels::guard_buffers() };
        case(&Emulated(schedule));
    }
}

#[test]
fn gemv_emulated_matches_cpu() {
    run_case("gemv", cases::gemv);
}

#[test]
fn gemv_silu_mul_emulated_matches_cpu() {
    run_case("gemv_silu_mul", cases::gemv_silu_mul);
}

#[test]
fn gemv_quant_emulated_matches_cpu() {
    run_case("gemv_quant", cases::gemv_quant);
}

#[test]
fn gemv_silu_mul_quant_emulated_matches_cpu() {
    run_case("gemv_silu_mul_quant", cases::gemv_silu_mul_quant);
}

#[test]
fn residual_norm_emulated_matches_cpu() {
    run_case("residual_norm", cases::residual_norm);
}

#[test]
fn rope_kv_emulated_matches_cpu_bit_for_bit() {
    run_case("rope_kv", cases::rope_kv_bit_for_bit);
}

#[test]
fn argmax_emulated_matches_cpu_ties_included() {
    run_case("argmax", cases::argmax_ties_included);
}

#[test]
fn decode_attention_emulated_matches_cpu() {
    run_case("decode_attention", cases::decode_attention_launches);
}

#[test]
fn step_attention_emulated_reads_its_length_from_device_state() {
    run_case("step_attention", cases::step_attention_reads_its_length_from_device_state);
}

#[test]
fn step_attention_emulated_batches_rows_over_their_slots() {
    run_case("step_attention_batched", cases::step_attention_batches_rows_over_their_slots);
}

#[test]
fn random_normal_emulated_matches_cpu() {
    run_case("random_normal", cases::random_normal);
}

/// The emulator holds launches to the kernels' parameter lists, as `cuLaunchKernel` would not.
#[test]
fn the_emulator_checks_argument_lists() {
    let (p, n) = (0u64, 5i32);
    let run = |args: &[expanse_cuda_emulator::Arg], name: &str| unsafe { expanse_cuda_emulator::launch(name, [1, 1, 1], [32, 1, 1], args, Schedule::Forward) };
    assert!(run(&[arg(&p), arg(&p), arg(&p), arg(&n), arg(&n)], "expanse_gemv_f32").unwrap_err().contains("5 arguments given, 6 expected"));
    assert!(run(&[arg(&p), arg(&p), arg(&p), arg(&n), arg(&n), arg(&p)], "expanse_gemv_f32")
        .unwrap_err()
        .contains("argument 5 is 8 bytes, the kernel takes 4"));
    assert!(run(&[], "expanse_nothing").unwrap_err().contains("no kernel named expanse_nothing"));
    // Every kernel `launch` names exists in the sources, for every dtype and head-dim variant.
    for k in crate::kernels::launch::Kernel::all() {
        for dtype in DTYPES {
            for d in [64, 128, 256] {
                let name = k.name(dtype, d).unwrap();
                assert!(!run(&[], &name).unwrap_err().contains("no kernel named"), "{name}");
            }
        }
    }
}

/// Under programmatic dependent launch a kernel may start before the previous one ends; every
/// kernel therefore waits (`pdl_wait`, griddepcontrol.wait) in every thread before it touches
/// memory. The emulator fails a launch in which a thread ends without waiting (every kernel case
/// above ran through that check); here a test kernel that writes without it.
#[test]
fn the_emulator_refuses_a_kernel_that_skips_the_pdl_wait() {
    let mut x = [0f32; 32];
    let p = x.as_mut_ptr() as u64;
    let e = unsafe { expanse_cuda_emulator::launch("expanse_emu_test_skips_pdl_wait", [1, 1, 1], [32, 1, 1], &[arg(&p)], Schedule::Forward) };
    assert!(e.unwrap_err().contains("without pdl_wait()"));
}

/// A warp-shuffle sum over half a warp is undefined on a GPU: the emulator refuses it (and runs the
/// same launch with a whole warp).
#[test]
fn the_emulator_refuses_partial_warps() {
    let (x, mut y) = ([1f32; 16], [0f32; 1]);
    let (xp, yp) = (x.as_ptr() as u64, y.as_mut_ptr() as u64);
    let (rows, cols, batch) = (1i32, 16i32, 1i32);
    let args = [arg(&xp), arg(&xp), arg(&yp), arg(&rows), arg(&cols), arg(&batch)];
    let e = unsafe { expanse_cuda_emulator::launch("expanse_gemv_f32", [1, 1, 1], [16, 1, 1], &args, Schedule::Forward) };
    assert!(e.unwrap_err().contains("16 of 32 lanes"));
    let e = unsafe { expanse_cuda_emulator::launch("expanse_gemv_f32", [1, 1, 1], [32, 1, 1], &args, Schedule::Reverse) };
    assert_eq!(e, Ok(()));
    assert_eq!(y[0], 16.0, "16 ones summed over the warp");
}

/// The guard is real: a GEMV launched one row past its weights' end, one row before their start (with
/// the front guard), or on weights already freed, dies at that read with a report naming the kernel
/// and block; so does host code reading past a buffer; the same launch in bounds runs. The test runs
/// itself again in a child process for each case, since the fault ends the process.
#[cfg(target_os = "linux")]
#[test]
fn the_memory_guard_stops_reads_out_of_bounds_or_of_freed_buffers() {
    use std::os::unix::process::ExitStatusExt;
    const CHILD: &str = "EXPANSE_GUARD_CHILD";
    if let Ok(case) = std::env::var(CHILD) {
        return guarded_reads_out_of_bounds(&case);
    }
    assert!(expanse_cuda_emulator::guard::active(), "the memory guard could not reserve its address range");
    let me = "kernels::tests::emulated::the_memory_guard_stops_reads_out_of_bounds_or_of_freed_buffers";
    let in_kernel = "kernel expanse_gemv_bf16 block (";
    for (case, named) in [("past-end", in_kernel), ("before-start", in_kernel), ("freed", in_kernel), ("host", "host code")] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", me, "--nocapture", "--test-threads=1"])
            .env(CHILD, case)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in bounds: ran"), "{case}: the launch in bounds did not run: {err}");
        assert!(!err.contains("out of bounds: ran"), "{case}: the guard did not stop the read: {err}");
        assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{case}: {:?}: {err}", out.status);
        let report = err.lines().find(|l| l.starts_with("memory guard: ")).unwrap_or_else(|| panic!("{case}: no report in {err}"));
        assert!(report.contains(named), "{case}: {report}");
    }
}

/// The child of the test above: a GEMV in bounds, then `case`: the weights one row short of the
/// rows launched, or addressed one row early, or freed before the launch, or a host read of the
/// element after the input's last.
#[cfg(target_os = "linux")]
fn guarded_reads_out_of_bounds(case: &str) {
    use crate::kernels::launch::{self, Launcher};
    let _guard = if case == "before-start" { crate::kernels::guard_buffers_front() } else { crate::kernels::guard_buffers() };
    // 7.5 pages of weights: a guard page on one side of them, slack on the other.
    let (rows, cols) = (60usize, 256usize);
    let k = EmulatedKernels { dtype: DType::BF16, head_dim: 128, schedule: Schedule::Forward };
    let w = Tensor::ones(rows * cols, DType::BF16, &Device::Cpu).unwrap();
    let x = Tensor::ones(cols, DType::BF16, &Device::Cpu).unwrap();
    let y = Tensor::zeros(rows + 1, DType::BF16, &Device::Cpu).unwrap();
    let (pw, px, py) = (host_ptr(&w).unwrap(), host_ptr(&x).unwrap(), host_ptr(&y).unwrap());
    k.launch(&launch::gemv(pw, px, py, rows, cols, 1).unwrap()).unwrap();
    assert_eq!(y.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0], cols as f32);
    eprintln!("in bounds: ran");
    match case {
        "past-end" => k.launch(&launch::gemv(pw, px, py, rows + 1, cols, 1).unwrap()).unwrap(),
        "before-start" => k.launch(&launch::gemv(pw - 2 * cols as u64, px, py, rows, cols, 1).unwrap()).unwrap(),
        "freed" => {
            drop(w);
            k.launch(&launch::gemv(pw, px, py, rows, cols, 1).unwrap()).unwrap();
        }
        _ => {
            // SAFETY: deliberately out of bounds: the guard page after `x`'s last element stops it.
            let past = unsafe { std::ptr::read_volatile((px as *const half::bf16).add(cols)) };
            std::hint::black_box(past);
        }
    }
    eprintln!("out of bounds: ran");
}
