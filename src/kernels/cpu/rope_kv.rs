//! Rotary embedding of one position's query and key, and the key/value write into the KV cache, on the
//! CPU (the decode step's `rope_kv` op).

use super::Elem;

/// Shapes of one `rope_kv` call. Heads are `head_dim` wide; the cache of one KV head is `capacity`
/// rows of `head_dim` (`[n_kv_heads, capacity, head_dim]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

/// Rotates `head` in place by the position's `cos`/`sin` rows (`head_dim / 2` each), the
/// rotate-half form, rounding each product and the sum to `T` as candle's `rope` (and transformers)
/// do in a half dtype.
#[inline(always)]
fn rotate<T: Elem>(head: &mut [T], cos: &[T], sin: &[T]) {
    let half = head.len() / 2;
    let r = |x: f32| T::from_f32(x).to_f32();
    for i in 0..half {
        let (x1, x2) = (head[i].to_f32(), head[i + half].to_f32());
        let (c, s) = (cos[i].to_f32(), sin[i].to_f32());
        head[i] = T::from_f32(r(x1 * c) - r(x2 * s));
        head[i + half] = T::from_f32(r(x1 * s) + r(x2 * c));
    }
}

/// `qkv` = `[q (n_heads·d) | k (n_kv·d) | v (n_kv·d)]` of one token: rotates its q and k heads in
/// place by the position's `cos`/`sin` rows.
pub(crate) fn rope_qk<T: Elem>(qkv: &mut [T], cos: &[T], sin: &[T], d: &RopeDims) {
    let hd = d.head_dim;
    for head in qkv[..(d.n_heads + d.n_kv_heads) * hd].chunks_mut(hd) {
        rotate(head, cos, sin);
    }
}

/// Writes one token's `rows` (`n_kv` heads of `head_dim`) into row `pos` of each head of `cache`
/// (`[n_kv, capacity, head_dim]`).
pub(crate) fn write_cache_rows<T: Elem>(cache: &mut [T], rows: &[T], pos: usize, d: &RopeDims) {
    let hd = d.head_dim;
    for (h, src) in rows.chunks(hd).enumerate() {
        let at = (h * d.capacity + pos) * hd;
        cache[at..at + hd].copy_from_slice(src);
    }
}

/// The whole `rope_kv` op on slices (what the CUDA kernel does in one launch, and is tested against):
/// rotates q and k in `qkv`, and writes k and v into row `pos` of the caches. The step itself writes
/// the rows through candle's in-place interface instead (`step::cpu`).
#[cfg(test)]
pub(crate) fn rope_kv<T: Elem>(qkv: &mut [T], cos: &[T], sin: &[T], k_cache: &mut [T], v_cache: &mut [T], pos: usize, d: &RopeDims) {
    rope_qk(qkv, cos, sin, d);
    let (nq, nkv) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
    write_cache_rows(k_cache, &qkv[nq..nq + nkv], pos, d);
    write_cache_rows(v_cache, &qkv[nq + nkv..nq + 2 * nkv], pos, d);
}
