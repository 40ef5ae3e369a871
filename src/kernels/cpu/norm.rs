//! The residual update and RMSNorm of a decode step on the CPU, rounded exactly where the reference
//! forward pass (candle's `rms_norm` in f32, then the weight in the model dtype) rounds.

use super::Elem;

/// `x ← x + add` (rounded to `T`, as candle's add; skipped when `add` is None), then
/// `h = round(round(x / rms(x)) · w)`, with `rms = sqrt(Σx²/n + eps)` summed left to right in f32.
/// For f32 the inner rounding is the identity, so `h = (x / rms) · w` as candle computes it.
pub(crate) fn residual_rms_norm<T: Elem>(x: &mut [T], add: Option<&[T]>, w: &[T], eps: f32, h: &mut [T]) {
    if let Some(d) = add {
        for (x, &d) in x.iter_mut().zip(d) {
            *x = T::from_f32(x.to_f32() + d.to_f32());
        }
    }
    let sum2: f32 = x.iter().map(|v| v.to_f32() * v.to_f32()).sum();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((h, &x), &w) in h.iter_mut().zip(x.iter()).zip(w) {
        *h = T::from_f32(T::from_f32(x.to_f32() / m).to_f32() * w.to_f32());
    }
}
