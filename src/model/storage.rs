//! Storage accounting and value comparison of weight tensors: which allocations a set of tensors
//! holds, whether two share one, whether two are equal as values.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Bytes of distinct storage behind `tensors`: views and copies of one allocation count once, and a
/// broadcast view counts only the elements it reaches.
pub fn storage_bytes<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> usize {
    let mut reach: HashMap<usize, usize> = HashMap::new();
    for t in tensors {
        if t.elem_count() == 0 {
            continue;
        }
        let key = storage_key(t);
        let layout = t.layout();
        let last: usize = layout.dims().iter().zip(layout.stride()).map(|(d, s)| (d - 1) * s).sum();
        let end = (layout.start_offset() + last + 1) * t.dtype().size_in_bytes();
        let e = reach.entry(key).or_default();
        *e = (*e).max(end);
    }
    reach.values().sum()
}

/// Identity of the allocation behind `t` (views and clones of one tensor share it).
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const candle_core::Storage as usize
}

/// Whether `a` and `b` are views of one allocation (a copied layer and its source, or a projection
/// and the stacked weight it is part of).
pub fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    storage_key(a) == storage_key(b)
}

/// Value equality of two tensors: −0.0 == +0.0 (mergekit's zero scaling writes −0.0 where an
/// in-memory copy may hold +0.0); different shapes or dtypes are simply unequal.
pub fn values_equal(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(false);
    }
    Ok(a.eq(b)?.min_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? == 1)
}
