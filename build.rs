//! Build script.
//!
//! Without the `cuda` feature it does nothing (and needs nothing).
//!
//! With `--features cuda` it compiles every `kernels/cuda/*.cu` with nvcc into
//! a fatbin, `$OUT_DIR/<stem>.fatbin`, which `src/kernels/cuda` embeds with
//! `include_bytes!` and loads as is: SASS for the target GPU, so the driver
//! compiles nothing at load time on it, and PTX for newer GPUs to JIT. The
//! architecture comes from `CUDA_COMPUTE_CAP` (as for candle-kernels): 90 ->
//! SASS for `sm_90a` (the `a` suffix for >= 90, like candle's cudaforge) plus
//! `compute_90` PTX (without the suffix: `a` PTX runs on that one arch only);
//! 80 -> `sm_80` + `compute_80`, 89 -> `sm_89` + `compute_89`. nvcc must be
//! 13.0: the driver JITs no PTX of a newer ISA. No `--use_fast_math`: the
//! kernels rely on IEEE semantics (exact division/sqrt, accurate expf).
//!
//! nvcc lookup: `$NVCC`, `$CUDA_ROOT/bin/nvcc`, `$CUDA_HOME/bin/nvcc`,
//! `$CUDA_PATH/bin/nvcc`, then `nvcc` on `PATH`.
//! See scripts/cuda-toolchain.sh for a toolchain without a system CUDA.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda::compile_fatbins();
    }
}

mod cuda {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const KERNEL_DIR: &str = "kernels/cuda";

    pub fn compile_fatbins() {
        for var in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-changed={KERNEL_DIR}");

        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR not set"));
        let nvcc = find_nvcc();
        let arch = gpu_arch();
        let ptx_arch = arch.trim_end_matches(['a', 'f']).to_string();

        let mut sources: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(KERNEL_DIR).unwrap_or_else(|e| panic!("cannot read {KERNEL_DIR}: {e}")) {
            let path = entry.expect("read_dir entry").path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("cu") => {
                    println!("cargo:rerun-if-changed={}", path.display());
                    sources.push(path)
                }
                Some("cuh") | Some("h") => println!("cargo:rerun-if-changed={}", path.display()),
                _ => continue,
            }
        }
        sources.sort();
        if sources.is_empty() {
            panic!("no .cu files found in {KERNEL_DIR}");
        }

        for src in &sources {
            let stem = src.file_stem().unwrap().to_string_lossy().to_string();
            let fatbin = out_dir.join(format!("{stem}.fatbin"));
            // Flags as scripts/kernel-audit.sh compiles the SASS it audits.
            let output = Command::new(&nvcc)
                .arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"))
                .arg(format!("-gencode=arch=compute_{ptx_arch},code=compute_{ptx_arch}"))
                .arg("-fatbin")
                .arg("-O3")
                .arg("-std=c++17")
                .arg("--expt-relaxed-constexpr")
                .arg("-I")
                .arg(KERNEL_DIR)
                .arg("-o")
                .arg(&fatbin)
                .arg(src)
                .output()
                .unwrap_or_else(|e| panic!("failed to run nvcc ({}): {e}", nvcc.display()));
            if !output.status.success() {
                panic!(
                    "nvcc failed on {} (arch {arch}):\n{}\n{}",
                    src.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }

    /// "90" -> "90a", "8.0"/"80" -> "80", "90a" stays, 120 -> "120a", 121 -> "121f".
    /// Same rule as candle's cudaforge, so our PTX matches candle-kernels'.
    fn gpu_arch() -> String {
        let raw = match std::env::var("CUDA_COMPUTE_CAP") {
            Ok(v) if !v.trim().is_empty() => v,
            _ => detect_with_nvidia_smi().unwrap_or_else(|| {
                panic!(
                    "building with the `cuda` feature needs CUDA_COMPUTE_CAP \
                     (e.g. CUDA_COMPUTE_CAP=90 for H100/H200) when no GPU is visible to nvidia-smi; \
                     `eval \"$(scripts/cuda-toolchain.sh)\"` sets it"
                )
            }),
        };
        let s = raw.trim().to_lowercase();
        let s = s.strip_prefix("sm_").unwrap_or(&s).replace('.', "");
        let (num, suffix) = match s.strip_suffix(['a', 'f']) {
            Some(n) => (n.to_string(), Some(s.chars().last().unwrap())),
            None => (s.clone(), None),
        };
        let base: u32 = num.parse().unwrap_or_else(|_| panic!("invalid CUDA_COMPUTE_CAP={raw:?}"));
        let base = if base < 20 { base * 10 } else { base };
        match suffix {
            Some(c) => format!("{base}{c}"),
            None if base > 120 => format!("{base}f"),
            None if base >= 90 => format!("{base}a"),
            None => format!("{base}"),
        }
    }

    fn detect_with_nvidia_smi() -> Option<String> {
        let out = Command::new("nvidia-smi").args(["--query-gpu=compute_cap", "--format=csv,noheader"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let first = String::from_utf8_lossy(&out.stdout).lines().next()?.trim().to_string();
        (!first.is_empty()).then_some(first)
    }

    fn find_nvcc() -> PathBuf {
        if let Some(p) = std::env::var_os("NVCC") {
            let p = PathBuf::from(p);
            if p.exists() {
                return p;
            }
        }
        for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
            if let Some(root) = std::env::var_os(var) {
                let p = Path::new(&root).join("bin").join("nvcc");
                if p.exists() {
                    return p;
                }
            }
        }
        if let Some(paths) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&paths) {
                let p = dir.join("nvcc");
                if p.is_file() {
                    return p;
                }
            }
        }
        panic!(
            "the `cuda` feature needs nvcc (CUDA 13.0) to compile kernels/cuda/*.cu, \
             but none was found via $NVCC, $CUDA_ROOT/bin, $CUDA_HOME/bin, $CUDA_PATH/bin or PATH. \
             On a machine without CUDA run: eval \"$(scripts/cuda-toolchain.sh)\""
        );
    }
}
