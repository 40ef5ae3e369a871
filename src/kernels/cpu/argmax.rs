//! Greedy choice on the CPU: the index of the largest logit.

use super::Elem;

/// The first index of the largest value (candle's `argmax` rule, which the sampler's greedy mode
/// uses); NaN never wins.
pub(crate) fn argmax<T: Elem>(logits: &[T]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, v) in logits.iter().enumerate() {
        let v = v.to_f32();
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}
