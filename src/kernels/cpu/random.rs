//! Normal random numbers from a counter-based hash, on the CPU: element `i` of a tensor depends only
//! on (seed, i), so the CUDA kernel (random_normal.cu) makes the same numbers (up to the last ulp of
//! its `logf`/`cosf`) in any order and without a generator's state.

use rayon::prelude::*;

use super::Elem;

/// splitmix64's finaliser: a bijective mix of 64 bits.
#[inline(always)]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The standard normal number of element `i` under `seed` (Box–Muller on two 24-bit uniforms; u1 in
/// (0, 1] so the log is finite).
#[inline(always)]
pub(crate) fn normal(seed: u64, i: u64) -> f32 {
    let h = mix64(seed ^ mix64(i));
    let u1 = ((h >> 40) + 1) as f32 * (1.0 / 16_777_216.0);
    let u2 = (h & 0xFF_FFFF) as f32 * (1.0 / 16_777_216.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// `out[i] = mean + std · normal(seed, i)`, rounded once to `T`; threaded.
pub(crate) fn fill_normal<T: Elem>(out: &mut [T], seed: u64, mean: f32, std: f32) {
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let base = (c as u64) << 16;
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = T::from_f32(mean + std * normal(seed, base + j as u64));
        }
    });
}
