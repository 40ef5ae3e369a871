//! Softmax over the last dimension for the small f32 inputs of attention on the CPU: stays on the
//! calling thread (candle hands every call to rayon, which costs more than the work here).

use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// Softmax over the last dim of an f32 CPU tensor; small inputs stay on this thread. Other inputs
/// go to candle's kernel.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.elem_count() < 1 << 16 {
        return x.contiguous()?.apply_op1_no_bwd(&SmallSoftmax);
    }
    candle_nn::ops::softmax_last_dim(x)
}

struct SmallSoftmax;

impl CustomOp1 for SmallSoftmax {
    fn name(&self) -> &'static str {
        "expanse-small-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((a, b)), CpuStorage::F32(v)) = (l.contiguous_offsets(), s) else {
            bail!("small softmax: contiguous f32 input");
        };
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = v[a..b].to_vec();
        // Same steps as candle's softmax_last_dim (max-subtracted exp, then divide by the sum).
        for row in out.chunks_mut(cols) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            for x in row.iter_mut() {
                *x /= sum;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
