//! Comparing two sets of numbers, in one place: max |Δ|, relative difference, element-wise closeness,
//! top-1 with a margin in bf16 ulps, and KL. The self-check, `verify`, `compare-logits`, `logits` and
//! the tests all compare through here, so they share one rule: **any non-finite value on either side
//! fails** (NaN never passes). `f32::max` and candle's `max_all` both drop NaN (`f32::max` returns
//! the other operand; candle keeps its running maximum unless `acc < x`), which is how NaN slipped
//! past earlier checks; nothing here folds with them.

use candle_core::{DType, Tensor};

/// Which side of a comparison a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Got,
    Want,
}

/// The first non-finite value of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct NonFinite {
    pub index: usize,
    pub side: Side,
    pub value: f32,
}

/// Where `got` and `want` differ most. Its figures are NaN whenever the comparison cannot hold (a
/// non-finite value, lengths that differ), so every `<=` test on them fails.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Diff {
    /// max |got − want|.
    pub max_abs: f32,
    /// The index of that maximum.
    pub at: usize,
    /// max |want|.
    pub max_want: f32,
    pub non_finite: Option<NonFinite>,
    /// (got, want) lengths.
    pub lengths: (usize, usize),
}

impl Diff {
    pub fn new(got: &[f32], want: &[f32]) -> Diff {
        let non_finite = first_non_finite(got, want);
        let lengths = (got.len(), want.len());
        if non_finite.is_some() || got.len() != want.len() {
            return Diff { max_abs: f32::NAN, at: non_finite.map_or(0, |n| n.index), max_want: f32::NAN, non_finite, lengths };
        }
        let (mut max_abs, mut at, mut max_want) = (0f32, 0usize, 0f32);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let d = (g - w).abs();
            if d > max_abs {
                (max_abs, at) = (d, i);
            }
            max_want = max_want.max(w.abs());
        }
        Diff { max_abs, at, max_want, non_finite: None, lengths }
    }

    /// Both tensors flattened to f32 (any dtype, any device).
    pub fn of_tensors(got: &Tensor, want: &Tensor) -> candle_core::Result<Diff> {
        if got.dims() != want.dims() {
            let n = |t: &Tensor| t.elem_count();
            return Ok(Diff { max_abs: f32::NAN, at: 0, max_want: f32::NAN, non_finite: None, lengths: (n(got), n(want)) });
        }
        Ok(Diff::new(&f32_values(got)?, &f32_values(want)?))
    }

    /// max |Δ| / max |want| (the denominator at least the smallest normal f32, so all-zero references
    /// compare by max |Δ|); NaN when the comparison cannot hold.
    pub fn rel(&self) -> f32 {
        self.max_abs / self.max_want.max(f32::MIN_POSITIVE)
    }

    /// Whether both sides are finite and of one length.
    pub fn comparable(&self) -> bool {
        self.non_finite.is_none() && self.lengths.0 == self.lengths.1
    }

    /// max |Δ| ≤ `atol` (false whenever the comparison cannot hold).
    pub fn within(&self, atol: f32) -> bool {
        self.comparable() && self.max_abs <= atol
    }

    /// max |Δ| ≤ `rel` × max |want| (false whenever the comparison cannot hold).
    pub fn within_rel(&self, rel: f32) -> bool {
        self.comparable() && self.rel() <= rel
    }
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.non_finite {
            let side = match n.side {
                Side::Got => "got",
                Side::Want => "reference",
            };
            return write!(f, "non-finite value {} at index {} ({side})", n.value, n.index);
        }
        if self.lengths.0 != self.lengths.1 {
            return write!(f, "lengths differ: {} vs {}", self.lengths.0, self.lengths.1);
        }
        write!(f, "max |Δ| {:.3e} at index {} ({:.3e} of the largest reference value)", self.max_abs, self.at, self.rel())
    }
}

/// The first non-finite value of `got`, else of `want`.
pub fn first_non_finite(got: &[f32], want: &[f32]) -> Option<NonFinite> {
    let find = |v: &[f32], side| v.iter().position(|x| !x.is_finite()).map(|index| NonFinite { index, side, value: v[index] });
    find(got, Side::Got).or_else(|| find(want, Side::Want))
}

/// Element-wise closeness: |got − want| ≤ atol + rtol·|want| at every index, both sides finite and of
/// one length. The error names the worst index (or the non-finite value).
pub fn close(got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("lengths differ: {} vs {}", got.len(), want.len()));
    }
    if let Some(n) = first_non_finite(got, want) {
        return Err(format!("non-finite value {} at index {} ({:?})", n.value, n.index, n.side));
    }
    let excess = |i: usize| (got[i] - want[i]).abs() - (atol + rtol * want[i].abs());
    match (0..got.len()).max_by(|&a, &b| excess(a).total_cmp(&excess(b))) {
        Some(i) if excess(i) > 0.0 => Err(format!("mismatch at index {i}: got {} expected {} (atol {atol}, rtol {rtol})", got[i], want[i])),
        _ => Ok(()),
    }
}

/// The maximum of `values`, NaN if any is NaN (0 for none): for worst-of summaries, where
/// `fold(0.0, f32::max)` would drop a NaN.
pub fn max_or_nan<T: Real>(values: impl IntoIterator<Item = T>) -> T {
    values.into_iter().fold(T::ZERO, |m, x| {
        if m.is_nan() || x.is_nan() {
            T::NAN
        } else if x > m {
            x
        } else {
            m
        }
    })
}

/// f32 and f64, for [`max_or_nan`].
pub trait Real: Copy + PartialOrd {
    const ZERO: Self;
    const NAN: Self;
    fn is_nan(self) -> bool;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const NAN: f32 = f32::NAN;
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const NAN: f64 = f64::NAN;
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// The index of the first maximum (candle's and the device argmax's tie rule); None when `v` is
/// empty or holds a NaN.
pub fn argmax(v: &[f32]) -> Option<usize> {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return None;
    }
    Some(v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best }))
}

/// One unit in the last place of `v` in bf16 (8 significant bits).
pub fn bf16_ulp(v: f32) -> f32 {
    2f32.powi(v.abs().max(f32::MIN_POSITIVE).log2().floor() as i32 - 7)
}

/// Top-1 of two logit rows, with the reference's top-2 margin in bf16 ulps of its top logit.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Top1 {
    /// None when `got` holds a non-finite value.
    pub got: Option<usize>,
    /// None when `want` holds a non-finite value.
    pub want: Option<usize>,
    /// NaN when `want` has no top-2 (non-finite values, fewer than two entries).
    pub margin_ulps: f32,
}

impl Top1 {
    pub fn new(got: &[f32], want: &[f32]) -> Top1 {
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        let g = if finite(got) { argmax(got) } else { None };
        let w = if finite(want) { argmax(want) } else { None };
        let margin_ulps = match w {
            Some(t) if want.len() > 1 => {
                let second = want.iter().enumerate().filter(|&(i, _)| i != t).map(|(_, &x)| x).fold(f32::NEG_INFINITY, f32::max);
                (want[t] - second) / bf16_ulp(want[t])
            }
            _ => f32::NAN,
        };
        Top1 { got: g, want: w, margin_ulps }
    }

    /// Both rows finite, and the same top-1 wherever the reference's top-2 margin exceeds `ulps` bf16
    /// ulps of its top logit (a nearer tie may go either way under any rounding).
    pub fn agrees(&self, ulps: f32) -> bool {
        match (self.got, self.want) {
            (Some(g), Some(w)) => g == w || self.margin_ulps <= ulps,
            _ => false,
        }
    }
}

impl std::fmt::Display for Top1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = |x: Option<usize>| x.map_or("none (non-finite)".to_string(), |i| i.to_string());
        write!(f, "top-1 {} vs reference {} (margin {:.2} bf16 ulps)", id(self.got), id(self.want), self.margin_ulps)
    }
}

/// KL(softmax(p) ‖ softmax(q)) of two logit rows, in f64: between nearly equal models it is a sum of
/// tiny terms of both signs, which f32 rounding would swamp (or drive negative). NaN when either row
/// holds a non-finite value or the lengths differ.
pub fn kl(p: &[f32], q: &[f32]) -> f64 {
    if p.len() != q.len() || p.is_empty() || first_non_finite(p, q).is_some() {
        return f64::NAN;
    }
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum()
}

/// log-softmax of a logit row in f64 (differences and sums exact to f64; a NaN is the caller's to refuse).
pub fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// A tensor's values as f32, flattened, on the host.
pub fn f32_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The places a NaN must be caught: first, middle, last.
    fn poisoned(len: usize) -> Vec<(usize, Vec<f32>)> {
        let base: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        [0, len / 2, len - 1]
            .into_iter()
            .flat_map(|at| {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].into_iter().map({
                    let base = base.clone();
                    move |bad| {
                        let mut v = base.clone();
                        v[at] = bad;
                        (at, v)
                    }
                })
            })
            .collect()
    }

    #[test]
    fn a_non_finite_value_anywhere_on_either_side_fails_every_comparison() {
        let len = 9;
        let clean: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        // The clean pair passes each comparison, so the failures below are the poison's.
        assert!(Diff::new(&clean, &clean).within(0.0) && Diff::new(&clean, &clean).within_rel(0.0));
        assert!(close(&clean, &clean, 0.0, 0.0).is_ok() && Top1::new(&clean, &clean).agrees(0.0));
        assert!(kl(&clean, &clean).abs() < 1e-12 && max_or_nan(clean.iter().copied()).is_finite());
        for (at, bad) in poisoned(len) {
            for (got, want, side) in [(&bad, &clean, Side::Got), (&clean, &bad, Side::Want)] {
                let what = format!("{} at {at} on the {side:?} side", bad[at]);
                let d = Diff::new(got, want);
                assert!(!d.within(f32::INFINITY) && !d.within_rel(f32::INFINITY), "{what}: {d}");
                assert_eq!(d.non_finite.map(|n| (n.index, n.side)), Some((at, side)), "{what}");
                assert!(d.max_abs.is_nan() && d.rel().is_nan(), "{what}: figures are NaN");
                assert!(close(got, want, f32::INFINITY, f32::INFINITY).is_err(), "{what}");
                assert!(!Top1::new(got, want).agrees(f32::INFINITY), "{what}");
                assert!(kl(got, want).is_nan(), "{what}");
            }
            if bad[at].is_nan() {
                assert!(max_or_nan(bad.iter().copied()).is_nan(), "max_or_nan drops a NaN at {at}");
                assert_eq!(argmax(&bad), None, "argmax of a row with NaN at {at}");
            }
        }
    }

    #[test]
    fn the_nan_blind_folds_it_replaces_do_drop_nan() {
        // Why this module exists: the folds used before pass these rows.
        let v = [1.0f32, f32::NAN, 3.0];
        assert_eq!(v.iter().copied().fold(0f32, f32::max), 3.0);
        let t = Tensor::new(&v, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t.max_all().unwrap().to_scalar::<f32>().unwrap(), 3.0, "candle's max_all keeps the first non-NaN run");
        assert!(max_or_nan(v).is_nan());
    }

    #[test]
    fn figures_on_finite_rows() {
        let d = Diff::new(&[1.0, 2.5, 3.0], &[1.0, 2.0, -4.0]);
        assert_eq!((d.max_abs, d.at, d.max_want), (7.0, 2, 4.0));
        assert_eq!(d.rel(), 1.75);
        assert!(d.within(7.0) && !d.within(6.9));
        assert!(!Diff::new(&[1.0], &[1.0, 2.0]).within(f32::INFINITY), "lengths differ");
        assert_eq!(close(&[1.0, 2.1], &[1.0, 2.0], 0.05, 0.0).unwrap_err(), "mismatch at index 1: got 2.1 expected 2 (atol 0.05, rtol 0)");
        assert!(close(&[1.0, 2.1], &[1.0, 2.0], 0.0, 0.051).is_ok());
        // Ties go to the first maximum; the margin is in bf16 ulps of the top logit (1/128 at 1.0).
        assert_eq!(argmax(&[0.5, 2.0, 2.0]), Some(1));
        let t = Top1::new(&[0.0, 1.0, 0.99], &[0.0, 0.99, 1.0]);
        assert_eq!((t.got, t.want), (Some(1), Some(2)));
        assert!((t.margin_ulps - 1.28).abs() < 1e-3, "{}", t.margin_ulps);
        assert!(t.agrees(2.0) && !t.agrees(1.0));
        assert_eq!(bf16_ulp(1.0), 1.0 / 128.0);
        assert_eq!(bf16_ulp(-3.0), 2.0 / 128.0);
        // KL of a shifted row is 0; of different rows, positive and equal to the hand sum.
        assert!(kl(&[1.0, 2.0, 3.0], &[11.0, 12.0, 13.0]).abs() < 1e-12);
        let (p, q) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        let (pa, pb) = (1.0 / (1.0 + 1f64.exp()), 1f64.exp() / (1.0 + 1f64.exp()));
        assert!((kl(&p, &q) - (pa * (pa / pb).ln() + pb * (pb / pa).ln())).abs() < 1e-12);
    }
}
