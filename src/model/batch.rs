//! The decode step of several sequences at once (`serve --parallel`): one token per sequence, each at
//! its own position in its own cache, each projection one pass over the weights for every row — and
//! each row's logits the bits that sequence gets decoding alone. No reduction here depends on the
//! batch: the projections run every row by the one-row loops (`Linear::forward_rows`), attention runs
//! per row over that row's cache, and the rest is element-wise or per row. So a greedy answer is the
//! same whoever else is being served, and whenever it joined.

use candle_core::Tensor;

use super::{residual_add, rms_norm, silu, Attention, Block, Cache, Model};
use crate::engine::ids_tensor;
use crate::error::{Error, Result};

/// The rotary rows of each sequence's position and, where composed ops attend, its mask.
struct Rows<'a, 'b> {
    cos: Tensor, // [n, head_dim/2]
    sin: Tensor, // [n, head_dim/2]
    /// Per row: the additive mask `[1, len + 1]` of a window the composed attention must apply.
    masks: Vec<Option<Tensor>>,
    caches: &'a mut [&'b mut Cache],
}

impl Model {
    /// Runs `tokens[i]` after what `caches[i]` holds, for every i, and returns the logits `[n, vocab]`
    /// (model dtype). Row i is bit for bit what [`Model::forward`] gives that token alone on that cache.
    pub fn decode_rows(&self, tokens: &[u32], caches: &mut [&mut Cache]) -> Result<Tensor> {
        if tokens.is_empty() || tokens.len() != caches.len() {
            return Err(Error::internal(format!("decode_rows: {} tokens for {} caches", tokens.len(), caches.len())));
        }
        for c in caches.iter() {
            c.check_room(1)?;
        }
        let positions: Vec<u32> = caches.iter().map(|c| c.len() as u32).collect();
        let at = Tensor::new(positions.as_slice(), &self.device)?;
        let masks = match self.device.is_cpu() {
            // The CPU's decode attention applies the window itself.
            true => vec![None; caches.len()],
            false => positions.iter().map(|&p| self.mask(1, p as usize)).collect::<Result<_>>()?,
        };
        let mut rows = Rows { cos: self.rotary.cos.index_select(&at, 0)?, sin: self.rotary.sin.index_select(&at, 0)?, masks, caches };
        let mut x = self.embed_tokens.index_select(&ids_tensor(tokens, &self.device)?.flatten_all()?, 0)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            if self.runs(block) {
                x = block.decode_rows(&x, &mut rows, layer, &self.unit_norm)?;
            }
        }
        for c in rows.caches.iter_mut() {
            c.advance(1);
        }
        let x = rms_norm(&x, &self.norm, &self.unit_norm, self.config.rms_norm_eps as f32)?;
        Ok(self.lm_head.forward_rows(&x)?)
    }
}

impl Block {
    /// The block on `x` `[n, hidden]`, one row per sequence (as `Block::forward` on each alone).
    fn decode_rows(&self, x: &Tensor, rows: &mut Rows<'_, '_>, layer: usize, unit_norm: &Tensor) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_layernorm, unit_norm, self.eps)?;
        let x = residual_add(x, &self.self_attn.decode_rows(&h, rows, layer)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, unit_norm, self.eps)?;
        // As `Mlp::forward` on one row: the stacked gate/up product, SiLU in f32, the product, down.
        let gate_up = self.mlp.gate_up_proj.forward_rows(&h)?;
        let i = self.mlp.up_proj.dims().0;
        let act = (silu(&gate_up.narrow(1, 0, i)?)? * gate_up.narrow(1, i, i)?)?;
        Ok(residual_add(&x, &self.mlp.down_proj.forward_rows(&act)?)?)
    }
}

impl Attention {
    /// Attention for `x` `[n, hidden]`, row i one token of the sequence cached in `rows.caches[i]`.
    fn decode_rows(&self, x: &Tensor, rows: &mut Rows<'_, '_>, layer: usize) -> Result<Tensor> {
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // The rows as positions of one sequence: the rotation is per position (its own cos/sin row).
        let qkv = self.qkv_proj.forward_rows(x)?.unsqueeze(0)?;
        let (q, k, v) = match crate::kernels::rope_heads(&qkv, &rows.cos, &rows.sin, d, nh + nkv) {
            Some(heads) => {
                let heads = heads?;
                (heads.narrow(1, 0, nh)?, heads.narrow(1, nh, nkv)?, heads.narrow(1, nh + nkv, nkv)?)
            }
            None => {
                let n = x.dim(0)?;
                let heads = |at: usize, h: usize| qkv.narrow(2, at * d, h * d)?.reshape((1, n, h, d))?.transpose(1, 2);
                let (q, k) = (heads(0, nh)?.contiguous()?, heads(nh, nkv)?.contiguous()?);
                let q = candle_nn::rotary_emb::rope(&q, &rows.cos, &rows.sin)?;
                (q, candle_nn::rotary_emb::rope(&k, &rows.cos, &rows.sin)?, heads(nh + nkv, nkv)?)
            }
        };
        let scale = 1.0 / (d as f64).sqrt();
        let mut ys = Vec::with_capacity(rows.caches.len());
        for (i, cache) in rows.caches.iter_mut().enumerate() {
            let row = |t: &Tensor| t.narrow(2, i, 1)?.contiguous();
            let (kc, vc) = cache.append(layer, &row(&k)?, &row(&v)?)?;
            let q = row(&q)?;
            let y = if q.device().is_cpu() {
                // As `Attention::forward` on one query: the fused kernel, rounding as eager attention.
                let total = kc.dim(2)?;
                crate::kernels::decode_attention_eager_rounding(&q, &kc, &vc, total, self.sliding_window, scale)?.reshape((1, nh * d))?
            } else {
                self.attend_composed(&q, &kc, &vc, rows.masks[i].as_ref())?.reshape((1, nh * d))?
            };
            ys.push(y);
        }
        Ok(self.o_proj.forward_rows(&Tensor::cat(&ys, 0)?)?)
    }
}
