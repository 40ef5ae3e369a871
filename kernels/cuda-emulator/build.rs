//! Compiles the kernel sources (../cuda/*.cu) as host C++ together with the emulator (emu.cpp).

fn main() {
    // Only a host build can run the tests that use it; cross checks (scripts/ci-metal.sh checks
    // an Apple target with `cargo check --all-targets`) never link it.
    if std::env::var("TARGET").ok() != std::env::var("HOST").ok() {
        return;
    }
    println!("cargo:rerun-if-changed=emu.cpp");
    println!("cargo:rerun-if-changed=include");
    println!("cargo:rerun-if-changed=../cuda");
    cc::Build::new()
        .cpp(true)
        .file("emu.cpp")
        .include("include")
        .include("../cuda")
        .std("c++17")
        .opt_level(2)
        // CUDA code reads a uint4 through a T*; nvcc allows it, host C++ only without strict aliasing.
        .flag("-fno-strict-aliasing")
        // Plain a*b+c stays two roundings, and the _rn intrinsics keep theirs.
        .flag("-ffp-contract=off")
        .flag("-Wno-unknown-pragmas")
        .warnings(true)
        .compile("expanse_cuda_emulator");
}
