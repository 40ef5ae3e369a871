//! `expanse logits`: f32 logits for every position of a sequence, written as safetensors for
//! comparison with other implementations; and `compare-logits` to compare two such files.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::engine::{ids_tensor, Loaded};
use crate::error::{Error, Result};
use crate::model::{Cache, Logits};
use crate::staging::Target;

/// Logits `[s, vocab]` in f32 for `ids`, one full-sequence forward from an empty cache.
pub fn all_logits(loaded: &Loaded, ids: &[u32]) -> Result<Tensor> {
    let model = &loaded.model;
    if ids.is_empty() {
        return Err(Error::flag("--prompt", "gives no tokens"));
    }
    let mut cache = Cache::new(model, ids.len())?;
    let out = model.forward(&ids_tensor(ids, &model.device)?, &mut cache, Logits::All)?;
    Ok(out.squeeze(0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// Writes `logits` and `input_ids` to `out` (checked by the caller) atomically.
pub fn write(out: &Target, ids: &[u32], logits: &Tensor) -> Result<()> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
    crate::loader::write_safetensors_to(out, &[("logits", logits), ("input_ids", &ids)], None)
}

/// Reads a file written by `write` (or by the fixture scripts).
pub fn read(path: &Path) -> Result<(Vec<u32>, Tensor)> {
    let ck = crate::loader::Checkpoint::open(&[path.to_path_buf()])?;
    let need = |n: &str| ck.entry(n).map(|e| e.shape.clone()).ok_or_else(|| Error::MissingTensor { path: path.into(), name: n.into() });
    let lshape = need("logits")?;
    let ishape = need("input_ids")?;
    let logits = ck.load("logits", &lshape, &Device::Cpu)?.to_dtype(DType::F32)?;
    let ids = ck.load("input_ids", &ishape, &Device::Cpu)?.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    Ok((ids.into_iter().map(|i| i as u32).collect(), logits))
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
    // Through `compare`: a non-finite value on either side makes max |Δ| NaN (no tolerance passes
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
