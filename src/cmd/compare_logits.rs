//! `expanse compare-logits`: two logits files (written by `expanse logits` or the fixture scripts)
//! side by side: max |Δ|, argmax agreement, bit-exactness; a difference past `--tolerance` fails.

use std::path::PathBuf;

use candle_core::Tensor;
use clap::Args;

use super::args::check_tolerance;
use super::logits::read;
use super::{print_json, Failure};
use crate::error::{Error, Result};

#[derive(Args)]
pub struct CompareLogitsArgs {
    a: PathBuf,
    b: PathBuf,
    /// Fail (exit 1) when max |Δ| exceeds this
    #[arg(long, default_value_t = 0.0)]
    tolerance: f32,
    #[arg(long)]
    json: bool,
}

/// `expanse compare-logits`
pub fn run(args: CompareLogitsArgs) -> Result<(), Failure> {
    let CompareLogitsArgs { a, b, tolerance, json } = args;
    check_tolerance(tolerance)?;
    let (ia, la) = read(&a)?;
    let (ib, lb) = read(&b)?;
    if la.rank() != 2 || la.dims() != lb.dims() {
        let msg = format!("holds logits of shape {:?}; {} holds {:?} (expected [positions, vocab])", lb.dims(), a.display(), la.dims());
        return Err(Error::bad_file(&b, msg).into());
    }
    if ia != ib {
        return Err(Error::bad_file(&b, format!("holds other input_ids than {}", a.display())).into());
    }
    let c = compare(&la, &lb)?;
    if json {
        print_json(&c)?;
    } else {
        println!(
            "positions {} · max |Δlogit| {:.3e} · argmax agreement {:.1}% · bit-exact {}",
            c.positions,
            c.max_abs_diff,
            100.0 * c.argmax_agreement,
            if c.bit_exact { "yes" } else { "no" }
        );
    }
    // Written so that a NaN difference fails.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(c.max_abs_diff <= tolerance) {
        return Err(Failure::Check(format!("FAIL: max |Δlogit| {:.3e} > tolerance {tolerance}", c.max_abs_diff)));
    }
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub positions: usize,
    pub max_abs_diff: f32,
    pub argmax_agreement: f64,
    pub bit_exact: bool,
}

/// Compares two `[s, vocab]` logit tensors.
pub fn compare(a: &Tensor, b: &Tensor) -> Result<Comparison> {
    if a.dims() != b.dims() || a.rank() != 2 {
        return Err(Error::internal(format!("logit shapes differ or are not [positions, vocab]: {:?} vs {:?}", a.dims(), b.dims())));
    }
    // Through `crate::compare`: a non-finite value on either side makes max |Δ| NaN (no tolerance passes
    // it) and the argmax of its row disagree.
    let (va, vb) = (crate::compare::f32_values(a)?, crate::compare::f32_values(b)?);
    let max_abs_diff = crate::compare::Diff::new(&va, &vb).max_abs;
    let width = a.dim(1)?.max(1);
    let am: Vec<Option<usize>> = va.chunks(width).map(crate::compare::argmax).collect();
    let bm: Vec<Option<usize>> = vb.chunks(width).map(crate::compare::argmax).collect();
    let agree = am.iter().zip(&bm).filter(|(x, y)| x.is_some() && x == y).count();
    let bit_exact = va.iter().zip(&vb).all(|(x, y)| x == y);
    Ok(Comparison { positions: am.len(), max_abs_diff, argmax_agreement: agree as f64 / am.len().max(1) as f64, bit_exact })
}
