//! The KV cache of one conversation: K and V buffers per executed layer, allocated once at the
//! context's capacity and written in place by both the reference forward pass and the fused decode
//! step, so either can continue what the other started.

use candle_core::{DType, Device, Tensor};

use super::Model;
use crate::error::{Error, Result};

/// One layer's keys and values, `[1, n_kv_heads, capacity, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

/// Where a cache sits in a pool of caches (`Cache::pool`): slot `index` of `of`, each layer a view of
/// one `[of, n_kv_heads, capacity, head_dim]` buffer, so a batched decode step addresses every slot
/// from the first one's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Identity of the pool.
    pub pool: usize,
    pub index: usize,
    pub of: usize,
}

/// The KV cache of one conversation for one model.
#[derive(Debug, Clone)]
pub struct Cache {
    /// Indexed by block; None for the blocks the model skips (they never attend).
    layers: Vec<Option<LayerKv>>,
    len: usize,
    capacity: usize,
    /// Distinguishes caches (a decode step is bound to the one whose buffers it addresses).
    id: usize,
    slot: Option<Slot>,
}

fn next_id() -> usize {
    static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Cache {
    /// Buffers for `capacity` tokens (at most the model's max_position_embeddings; 0 makes a cache that
    /// holds nothing) for every block the model runs. Allocated now, so a conversation never reallocates or copies its cache.
    pub fn new(model: &Model, capacity: usize) -> Result<Cache> {
        let layers = layer_buffers(model, 1, capacity)?;
        Ok(Cache { layers, len: 0, capacity, id: next_id(), slot: None })
    }

    /// `slots` caches of `capacity` tokens each in one allocation per layer (the batched decode step
    /// runs the slots of one pool). Each slot is a cache like any other to everything else.
    pub fn pool(model: &Model, slots: usize, capacity: usize) -> Result<Vec<Cache>> {
        let whole = layer_buffers(model, slots, capacity)?;
        let pool = next_id();
        (0..slots)
            .map(|index| {
                let view = |kv: &LayerKv| -> Result<LayerKv> { Ok(LayerKv { k: kv.k.narrow(0, index, 1)?, v: kv.v.narrow(0, index, 1)? }) };
                let layers = whole.iter().map(|l| l.as_ref().map(view).transpose()).collect::<Result<_>>()?;
                Ok(Cache { layers, len: 0, capacity, id: next_id(), slot: Some(Slot { pool, index, of: slots }) })
            })
            .collect()
    }

    /// The cache's place in its pool (None for a cache of its own).
    pub fn slot(&self) -> Option<Slot> {
        self.slot
    }

    /// Tokens already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Identity of this cache's buffers (a clone shares them, and the identity).
    pub fn id(&self) -> usize {
        self.id
    }

    /// Forgets every token (the buffers stay).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Drops everything after the first `len` tokens (the buffers stay).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The buffers of block `layer` (None when the model skips it).
    pub fn layer(&self, layer: usize) -> Option<&LayerKv> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    /// Checks that `s` more tokens fit.
    pub(crate) fn check_room(&self, s: usize) -> Result<()> {
        if self.len + s > self.capacity {
            return Err(Error::ContextFull { needed: self.len + s, capacity: self.capacity });
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[1, n_kv, s, d]`) of block `layer` at the current position and returns views
    /// of everything cached for it so far. `advance` moves the position once every layer has written.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        let len = self.len;
        let Some(kv) = self.layers.get(layer).and_then(Option::as_ref) else {
            return Err(candle_core::Error::Msg(format!("no KV cache for block {layer}, which the model skips")).into());
        };
        kv.k.slice_set(&k.contiguous()?, 2, len)?;
        kv.v.slice_set(&v.contiguous()?, 2, len)?;
        Ok((kv.k.narrow(2, 0, len + s)?, kv.v.narrow(2, 0, len + s)?))
    }

    /// Counts `s` more tokens as cached (after every layer wrote them).
    pub(crate) fn advance(&mut self, s: usize) {
        self.len += s;
    }
}

/// Zeroed K and V buffers `[slots, n_kv_heads, capacity, head_dim]` for every block the model runs
/// (None for the ones it skips); `capacity` at most the model's max_position_embeddings.
fn layer_buffers(model: &Model, slots: usize, capacity: usize) -> Result<Vec<Option<LayerKv>>> {
    let max = model.config.max_position_embeddings;
    if capacity > max {
        return Err(Error::ContextTooLong { tokens: capacity, max });
    }
    let shape = (slots, model.config.num_key_value_heads, capacity, model.config.head_dim);
    model.blocks.iter().map(|b| model.runs(b).then(|| kv_buffers(shape, model.dtype, &model.device)).transpose()).collect()
}

fn kv_buffers(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<LayerKv> {
    Ok(LayerKv { k: Tensor::zeros(shape, dtype, device)?, v: Tensor::zeros(shape, dtype, device)? })
}
