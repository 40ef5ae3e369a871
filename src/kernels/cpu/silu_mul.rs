//! The SwiGLU activation of a decode step on the CPU: the epilogue of the stacked gate/up GEMV.

use super::Elem;

/// `SiLU(x) = x / (1 + e^−x)` in f32, as candle computes it.
#[inline(always)]
pub(crate) fn silu_f32(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// From the f32 products of the stacked gate/up weight (`[gate (n) | up (n)]`), `out[i] =
/// round(round(silu(round(gate_i))) · round(up_i))`: the roundings of the reference, which rounds
/// the projections to `T`, computes SiLU in f32 and multiplies in `T`.
pub(crate) fn silu_mul<T: Elem>(gate_up: &[f32], out: &mut [T]) {
    let (gate, up) = gate_up.split_at(out.len());
    let r = |x: f32| T::from_f32(x).to_f32();
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = T::from_f32(r(silu_f32(r(g))) * r(u));
    }
}
