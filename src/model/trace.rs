//! Tracing the reference forward pass, for the checks that look inside it: the last position's value
//! after every op (`OpTrace`, the fused step's self-check compares op by op) and what each block did
//! to the residual stream (`BlockTrace`, `verify`). The plain forward pass records nothing.

use candle_core::{DType, Module, Tensor};

use super::{silu, Cache, Logits, Mlp, Model, StepCtx};
use crate::error::Result;

impl Model {
    /// [`Model::forward`] (last position) that also records every intermediate value of the last
    /// position in `ops`.
    pub fn forward_op_traced(&self, ids: &Tensor, cache: &mut Cache, ops: &mut OpTrace) -> Result<Tensor> {
        self.forward_inner(ids, cache, Logits::Last, None, Some(ops))
    }

    /// [`Model::forward`] that also records what each block did to the residual stream in `trace`.
    pub fn forward_traced(&self, ids: &Tensor, cache: &mut Cache, logits: Logits, trace: Option<&mut Vec<BlockTrace>>) -> Result<Tensor> {
        self.forward_inner(ids, cache, logits, trace, None)
    }
}

impl Mlp {
    /// [`Module::forward`] that records the activation and the output when the context traces.
    pub(super) fn forward_traced(&self, x: &Tensor, ctx: &mut StepCtx, layer: usize) -> Result<Tensor> {
        if ctx.ops.is_none() {
            return Ok(self.forward(x)?);
        }
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let act = (silu(&gate)? * up)?;
        ctx.record(Some(layer), "act", &act)?;
        let down = self.down_proj.forward(&act)?;
        ctx.record(Some(layer), "down", &down)?;
        Ok(down)
    }
}

impl StepCtx<'_> {
    /// Records the last position of `t` (`[b, s, n]`) as `name` of `layer`, when tracing.
    pub(super) fn record(&mut self, layer: Option<usize>, name: &'static str, t: &Tensor) -> Result<()> {
        if let Some(ops) = self.ops.as_deref_mut() {
            let s = t.dim(1)?;
            ops.push(layer, name, &t.narrow(1, s - 1, 1)?.flatten_all()?)?;
        }
        Ok(())
    }

    /// Records the last position of per-head tensors (`[b, heads, s, d]` each), concatenated.
    pub(super) fn record_heads(&mut self, layer: usize, name: &'static str, parts: &[&Tensor]) -> Result<()> {
        if let Some(ops) = self.ops.as_deref_mut() {
            let rows = parts
                .iter()
                .map(|t| {
                    let s = t.dim(2)?;
                    t.narrow(2, s - 1, 1)?.flatten_all()
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            ops.push(Some(layer), name, &Tensor::cat(&rows, 0)?)?;
        }
        Ok(())
    }
}

/// The last position's intermediate values of one forward call, by (block, name): what the fused
/// step's self-check compares op by op. Names: `x_in`, `h_in`, `qkv` (before RoPE), `qkv_rot`, `y`
/// (attention output), `o`, `x_mid`, `h_post`, `act`, `down` per block; `h_final` and `logits`.
#[derive(Debug, Default)]
pub struct OpTrace {
    values: Vec<(Option<usize>, &'static str, Vec<f32>)>,
}

impl OpTrace {
    fn push(&mut self, layer: Option<usize>, name: &'static str, t: &Tensor) -> Result<()> {
        self.values.push((layer, name, t.to_dtype(DType::F32)?.to_vec1::<f32>()?));
        Ok(())
    }

    pub fn get(&self, layer: Option<usize>, name: &str) -> Option<&[f32]> {
        self.values.iter().find(|(l, n, _)| *l == layer && *n == name).map(|(_, _, v)| v.as_slice())
    }
}

/// What one block did to the residual stream, for `verify`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockTrace {
    pub layer: usize,
    pub source: usize,
    /// ‖out − in‖ / ‖in‖ over all positions of the call (Frobenius, f32).
    pub relative_delta: f64,
    /// The block's output equals its input bit for bit (−0.0 and +0.0 count as equal).
    pub identical: bool,
    pub skipped: bool,
}

/// How far `output` moved from `input`: ‖out − in‖ / ‖in‖ and bit-identity.
pub(super) fn trace_block(layer: usize, source: usize, input: &Tensor, output: &Tensor) -> Result<BlockTrace> {
    let a = input.to_dtype(DType::F32)?;
    let delta = (output.to_dtype(DType::F32)? - &a)?;
    let dn = delta.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let an = a.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let identical = output.eq(input)?.min_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? == 1;
    let relative_delta = if an > 0.0 { (dn / an).sqrt() } else { dn.sqrt() };
    Ok(BlockTrace { layer, source, relative_delta, identical, skipped: false })
}
