//! The launches of expanse's CUDA kernels: which function, grid, block and argument list each op
//! takes, computed in one place for every executor of `kernels/cuda/*.cu` (the CUDA stream in
//! `cuda`, the CPU emulator in the tests). The kernels take raw device addresses, so the decode step
//! launches them on its own buffers and captures them in a graph without candle allocating.

use candle_core::{bail, DType, Result};

use super::cpu::RopeDims;
use super::{dtype_suffix, AttnDims, MAX_HEAD_DIM};

/// A device address (what every buffer argument is).
pub(crate) type DevPtr = u64;

/// Warps (= output rows) per GEMV block.
const GEMV_WARPS: u32 = 8;
/// Rows of x the `_tiled` GEMV kernels take per read of the weights (GEMV_NX and GEMV_SILU_NX in
/// gemv.cu): batches of at least this many launch them, smaller ones the plain kernels (fewer
/// registers). Both give each row the same bits.
const GEMV_TILE: usize = 4;
const GEMV_SILU_TILE: usize = 2;
/// Warps per decode-attention block (NW in decode_attention.cu).
const ATTN_WARPS: u32 = 4;
/// Query heads of one KV head a decode-attention block serves (GMAX in decode_attention.cu).
const ATTN_HEADS_PER_BLOCK: usize = 4;
/// Blocks the split-KV attention aims for: about two per SM of an H100/H200, enough 16-byte loads in
/// flight to cover the memory latency, and few enough splits for the fused combine to stay short.
const ATTN_TARGET_BLOCKS: usize = 256;
/// Fewest keys a split handles (below that merging the splits costs more than it saves).
const ATTN_MIN_KEYS_PER_SPLIT: usize = 64;

/// The quantized block types of gemv_quant.cu's kernels (GGML's; `quant::QuantType` maps onto them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QuantKernel {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantKernel {
    pub(crate) const ALL: [QuantKernel; 8] =
        [QuantKernel::Q8_0, QuantKernel::Q4_0, QuantKernel::Q4_1, QuantKernel::Q5_0, QuantKernel::Q5_1, QuantKernel::Q4K, QuantKernel::Q5K, QuantKernel::Q6K];

    /// The type as the kernels' names spell it.
    fn suffix(self) -> &'static str {
        match self {
            QuantKernel::Q8_0 => "q8_0",
            QuantKernel::Q4_0 => "q4_0",
            QuantKernel::Q4_1 => "q4_1",
            QuantKernel::Q5_0 => "q5_0",
            QuantKernel::Q5_1 => "q5_1",
            QuantKernel::Q4K => "q4_k",
            QuantKernel::Q5K => "q5_k",
            QuantKernel::Q6K => "q6_k",
        }
    }

    /// Values per block: a row is whole blocks.
    pub(crate) fn block_values(self) -> usize {
        match self {
            QuantKernel::Q4K | QuantKernel::Q5K | QuantKernel::Q6K => 256,
            _ => 32,
        }
    }
}

/// A kernel family; with a dtype (and, for attention, a head dimension) it names one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    ResidualNorm,
    Gemv,
    GemvTiled,
    GemvSiluMul,
    GemvSiluMulTiled,
    /// `Gemv` over a quantized weight (gemv_quant.cu).
    GemvQuant(QuantKernel),
    GemvSiluMulQuant(QuantKernel),
    RopeKv,
    Attention,
    Argmax,
    RandomNormal,
}

impl Kernel {
    /// Every kernel (a device loads them together, before any graph capture).
    pub(crate) fn all() -> Vec<Kernel> {
        let quant = QuantKernel::ALL.into_iter().flat_map(|q| [Kernel::GemvQuant(q), Kernel::GemvSiluMulQuant(q)]);
        let dense = [Kernel::ResidualNorm, Kernel::Gemv, Kernel::GemvTiled, Kernel::GemvSiluMul, Kernel::GemvSiluMulTiled];
        let rest = [Kernel::RopeKv, Kernel::Attention, Kernel::Argmax, Kernel::RandomNormal];
        dense.into_iter().chain(quant).chain(rest).collect()
    }

    /// The source file's stem (`kernels/cuda/<stem>.cu`, the PTX module).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the emulator compiles every file at once
    pub(crate) fn file(self) -> &'static str {
        match self {
            Kernel::ResidualNorm => "residual_norm",
            Kernel::Gemv | Kernel::GemvTiled | Kernel::GemvSiluMul | Kernel::GemvSiluMulTiled => "gemv",
            Kernel::GemvQuant(_) | Kernel::GemvSiluMulQuant(_) => "gemv_quant",
            Kernel::RopeKv => "rope_kv",
            Kernel::Attention => "decode_attention",
            Kernel::Argmax => "argmax",
            Kernel::RandomNormal => "random_normal",
        }
    }

    /// The function's name for `dtype` (attention: for heads of `head_dim`).
    pub(crate) fn name(self, dtype: DType, head_dim: usize) -> Result<String> {
        let sfx = dtype_suffix(dtype)?;
        Ok(match self {
            Kernel::ResidualNorm => format!("expanse_residual_norm_{sfx}"),
            Kernel::Gemv => format!("expanse_gemv_{sfx}"),
            Kernel::GemvTiled => format!("expanse_gemv_tiled_{sfx}"),
            Kernel::GemvSiluMul => format!("expanse_gemv_silu_mul_{sfx}"),
            Kernel::GemvSiluMulTiled => format!("expanse_gemv_silu_mul_tiled_{sfx}"),
            Kernel::GemvQuant(q) => format!("expanse_gemv_{}_{sfx}", q.suffix()),
            Kernel::GemvSiluMulQuant(q) => format!("expanse_gemv_silu_mul_{}_{sfx}", q.suffix()),
            Kernel::RopeKv => format!("expanse_rope_kv_{sfx}"),
            Kernel::Attention => format!("expanse_decode_attn_{sfx}_{}", attention_variant(head_dim)?),
            Kernel::Argmax => format!("expanse_argmax_{sfx}"),
            Kernel::RandomNormal => format!("expanse_random_normal_{sfx}"),
        })
    }
}

/// The decode-attention variant for a head dimension (the largest it handles).
fn attention_variant(head_dim: usize) -> Result<&'static str> {
    Ok(match head_dim {
        0 => bail!("decode_attention: head_dim 0"),
        1..=64 => "d64",
        65..=128 => "d128",
        129..=MAX_HEAD_DIM => "d256",
        d => bail!("decode_attention: head_dim {d} > {MAX_HEAD_DIM} is not supported on CUDA"),
    })
}

/// One argument, typed as the kernel's parameter is (a mismatch is a wrong read on the device).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(DevPtr),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
}

/// One launch: function, grid, threads per block (1-D blocks) and arguments.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub kernel: Kernel,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub args: Vec<Arg>,
}

/// Runs launches: the CUDA stream, or the emulator in the tests.
pub(crate) trait Launcher {
    fn launch(&self, l: &Launch) -> Result<()>;
}

/// One decode-attention launch: where q, the cache and the output live, and which keys to attend.
pub(crate) struct AttnLaunch {
    pub q: DevPtr,
    pub k: DevPtr,
    pub v: DevPtr,
    pub out: DevPtr,
    /// The split scratch (`attention_scratch_words` of it, zero when allocated; unused with one
    /// split): partials `[b, n_heads, splits, head_dim + 2]` (f32), then the head groups' counters.
    pub partial: DevPtr,
    /// The step's state, 4 words per row of the batch (row b: kv_len = its pos + 1, its cache slot
    /// `slot` of k and v), or 0 to use `kv_len` (cache b for row b).
    pub state: DevPtr,
    pub kv_len: usize,
    /// Sliding window (0: none).
    pub window: usize,
    pub splits: usize,
    pub scale: f32,
    /// Heads and strides (kv_start/kv_end unused: the kernel derives them).
    pub dims: AttnDims,
    /// The batch `partial` was sized for (`attention_scratch_words`), at least `dims.b`: the
    /// counters sit after that many rows' partials, wherever a smaller batch's partials end.
    pub scratch_batch: usize,
}

fn i32_arg(what: &str, v: usize) -> Result<Arg> {
    i32::try_from(v).map(Arg::I32).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} does not fit in i32")))
}

/// For each of `batch` rows (`x`, `add`, `h` `[batch, cols]`, the row's state at `state` + 4·row
/// words): `x = table[state.token]` (table ≠ 0) or `x += add` (add ≠ 0), then `h = rms_norm(x) · w`
/// (`expanse_residual_norm_*`). One block per row.
#[allow(clippy::too_many_arguments)] // one per kernel parameter, in the kernel's order
pub(crate) fn residual_norm(x: DevPtr, add: DevPtr, table: DevPtr, state: DevPtr, w: DevPtr, h: DevPtr, cols: usize, eps: f32, batch: usize) -> Result<Launch> {
    use Arg::Ptr;
    let args = vec![Ptr(x), Ptr(add), Ptr(table), Ptr(state), Ptr(w), Ptr(h), i32_arg("hidden_size", cols)?, Arg::F32(eps)];
    Ok(Launch { kernel: Kernel::ResidualNorm, grid: (u32_grid("batch", batch)?, 1, 1), block: 1024, args })
}

/// `y = round(x · wᵀ)` for `w` `[rows, cols]`, `x` `[batch, cols]`, `y` `[batch, rows]`
/// (`expanse_gemv[_tiled]_*`): one warp per weight row, read once per tile of rows of x.
pub(crate) fn gemv(w: DevPtr, x: DevPtr, y: DevPtr, rows: usize, cols: usize, batch: usize) -> Result<Launch> {
    let grid = (u32_grid("rows", rows.div_ceil(GEMV_WARPS as usize))?, 1, 1);
    let args = vec![Arg::Ptr(w), Arg::Ptr(x), Arg::Ptr(y), i32_arg("rows", rows)?, i32_arg("cols", cols)?, i32_arg("batch", batch)?];
    let kernel = if batch >= GEMV_TILE { Kernel::GemvTiled } else { Kernel::Gemv };
    Ok(Launch { kernel, grid, block: GEMV_WARPS * 32, args })
}

/// `y[:, ..rows] = round(x · wᵀ)` for a quantized `w` `[rows, cols]` of type `q` (its blocks at `w`),
/// `x` `[batch, cols]`, `y` rows `y_stride` apart (`expanse_gemv_<q>_*`): a mixed stack's rows of one
/// type write their columns of the stack's output (`y` offset to the first). One warp per weight row.
#[allow(clippy::too_many_arguments)] // one per kernel parameter, in the kernel's order
pub(crate) fn gemv_quant(q: QuantKernel, w: DevPtr, x: DevPtr, y: DevPtr, rows: usize, cols: usize, batch: usize, y_stride: usize) -> Result<Launch> {
    if !cols.is_multiple_of(q.block_values()) || y_stride < rows {
        bail!("gemv_{}: {rows} × {cols} (rows of whole {}-value blocks) into rows of {y_stride}", q.suffix(), q.block_values());
    }
    let grid = (u32_grid("rows", rows.div_ceil(GEMV_WARPS as usize))?, 1, 1);
    let args =
        vec![Arg::Ptr(w), Arg::Ptr(x), Arg::Ptr(y), i32_arg("rows", rows)?, i32_arg("cols", cols)?, i32_arg("batch", batch)?, i32_arg("y_stride", y_stride)?];
    Ok(Launch { kernel: Kernel::GemvQuant(q), grid, block: GEMV_WARPS * 32, args })
}

/// `y = silu(x · gateᵀ) · (x · upᵀ)` for the stacked quantized `w` `[2n, cols]` of type `q`
/// (`expanse_gemv_silu_mul_<q>_*`).
pub(crate) fn gemv_silu_mul_quant(q: QuantKernel, w: DevPtr, x: DevPtr, y: DevPtr, n: usize, cols: usize, batch: usize) -> Result<Launch> {
    if !cols.is_multiple_of(q.block_values()) {
        bail!("gemv_silu_mul_{}: rows of {cols} are not whole {}-value blocks", q.suffix(), q.block_values());
    }
    let grid = (u32_grid("intermediate_size", n.div_ceil(GEMV_WARPS as usize))?, 1, 1);
    let args = vec![Arg::Ptr(w), Arg::Ptr(x), Arg::Ptr(y), i32_arg("intermediate_size", n)?, i32_arg("cols", cols)?, i32_arg("batch", batch)?];
    Ok(Launch { kernel: Kernel::GemvSiluMulQuant(q), grid, block: GEMV_WARPS * 32, args })
}

/// `y = silu(x · gateᵀ) · (x · upᵀ)` for the stacked `w` `[2n, cols]`, `x` `[batch, cols]`, `y`
/// `[batch, n]` (`expanse_gemv_silu_mul_*`).
pub(crate) fn gemv_silu_mul(w: DevPtr, x: DevPtr, y: DevPtr, n: usize, cols: usize, batch: usize) -> Result<Launch> {
    let grid = (u32_grid("intermediate_size", n.div_ceil(GEMV_WARPS as usize))?, 1, 1);
    let args = vec![Arg::Ptr(w), Arg::Ptr(x), Arg::Ptr(y), i32_arg("intermediate_size", n)?, i32_arg("cols", cols)?, i32_arg("batch", batch)?];
    let kernel = if batch >= GEMV_SILU_TILE { Kernel::GemvSiluMulTiled } else { Kernel::GemvSiluMul };
    Ok(Launch { kernel, grid, block: GEMV_WARPS * 32, args })
}

/// For each of `batch` rows of `qkv`: RoPE on q and k at the row's `state.pos`, k and v written into
/// slot `state.slot` of the caches `[slots, n_kv, cap, d]` (`expanse_rope_kv_*`): one thread per
/// rotated pair or copied value, grid y the row.
#[allow(clippy::too_many_arguments)] // one per kernel parameter, in the kernel's order
pub(crate) fn rope_kv(qkv: DevPtr, cos: DevPtr, sin: DevPtr, k_cache: DevPtr, v_cache: DevPtr, state: DevPtr, d: &RopeDims, batch: usize) -> Result<Launch> {
    let total = (d.n_heads + d.n_kv_heads) * d.head_dim / 2 + d.n_kv_heads * d.head_dim;
    let grid = (u32_grid("rope threads", total.div_ceil(256))?, u32_grid("batch", batch)?, 1);
    let mut args: Vec<Arg> = [qkv, cos, sin, k_cache, v_cache, state].map(Arg::Ptr).to_vec();
    args.extend([i32_arg("n_heads", d.n_heads)?, i32_arg("n_kv_heads", d.n_kv_heads)?, i32_arg("head_dim", d.head_dim)?, i32_arg("capacity", d.capacity)?]);
    Ok(Launch { kernel: Kernel::RopeKv, grid, block: 256, args })
}

/// Decode attention (`expanse_decode_attn_*_d{64,128,256}`): grid (KV heads × head groups, splits,
/// batch); with several splits each block writes its partials and the last block of a head group
/// merges them into the output, in the same launch.
pub(crate) fn attention(a: &AttnLaunch) -> Result<Launch> {
    let d = &a.dims;
    if a.splits == 0 || a.splits > 65_535 || d.b > 65_535 {
        bail!("decode_attention: {} splits × batch {} is out of range", a.splits, d.b);
    }
    let groups = d.n_kv_heads * (d.n_heads / d.n_kv_heads).div_ceil(ATTN_HEADS_PER_BLOCK);
    let grid = (u32_grid("attention head groups", groups)?, a.splits as u32, d.b as u32);
    if a.scratch_batch < d.b {
        bail!("decode_attention: scratch for a batch of {} used by a batch of {}", a.scratch_batch, d.b);
    }
    let sized = AttnDims { b: a.scratch_batch, ..*d };
    let counters = if a.splits > 1 { a.partial + 4 * partial_words(&sized, a.splits) as DevPtr } else { 0 };
    let mut args: Vec<Arg> = [a.q, a.k, a.v, a.out, a.partial, counters].map(Arg::Ptr).to_vec();
    args.extend([i32_arg("n_heads", d.n_heads)?, i32_arg("n_kv_heads", d.n_kv_heads)?, i32_arg("head_dim", d.head_dim)?]);
    args.extend([d.q_sb, d.q_sh, d.k_sb, d.k_sh, d.k_ss, d.v_sb, d.v_sh, d.v_ss].map(|s| Arg::I64(s as i64)));
    args.extend([Arg::Ptr(a.state), i32_arg("kv_len", a.kv_len)?, i32_arg("sliding_window", a.window)?, Arg::F32(a.scale)]);
    Ok(Launch { kernel: Kernel::Attention, grid, block: ATTN_WARPS * 32, args })
}

/// Blocks of one attention split: the batch times the KV heads times the groups of up to
/// `ATTN_HEADS_PER_BLOCK` query heads sharing one.
pub(crate) fn attention_blocks_per_split(b: usize, n_heads: usize, n_kv_heads: usize) -> usize {
    b * n_kv_heads * (n_heads / n_kv_heads.max(1)).div_ceil(ATTN_HEADS_PER_BLOCK)
}

/// How many splits the attention over `n_keys` keys uses when a split has `blocks_per_split`
/// blocks (`attention_blocks_per_split`): enough blocks to fill the GPU, none shorter than
/// `ATTN_MIN_KEYS_PER_SPLIT` keys. The decode step sizes it by the cache capacity once, since a
/// captured graph cannot change it.
pub(crate) fn attention_splits(n_keys: usize, blocks_per_split: usize) -> usize {
    let by_occupancy = ATTN_TARGET_BLOCKS.div_ceil(blocks_per_split.max(1)).max(1);
    let by_len = n_keys.div_ceil(ATTN_MIN_KEYS_PER_SPLIT).max(1);
    by_occupancy.min(by_len).min(65_535)
}

/// The f32 partials of a split attention: `[b, n_heads, splits, head_dim + 2]`.
fn partial_words(d: &AttnDims, splits: usize) -> usize {
    d.b * d.n_heads * splits * (d.head_dim + 2)
}

/// Size of the attention's scratch in 4-byte words: the partials, then one u32 counter per head
/// group (zero when allocated; the kernel leaves them zero). At least one word.
pub(crate) fn attention_scratch_words(d: &AttnDims, splits: usize) -> usize {
    if splits <= 1 {
        return 1;
    }
    partial_words(d, splits) + attention_blocks_per_split(d.b, d.n_heads, d.n_kv_heads)
}

/// For each of `batch` rows of `logits` `[batch, n]`: the row's `state.next = argmax(row)`
/// (`expanse_argmax_*`). One block per row.
pub(crate) fn argmax(logits: DevPtr, n: usize, state: DevPtr, batch: usize) -> Result<Launch> {
    let args = vec![Arg::Ptr(logits), i32_arg("vocab_size", n)?, Arg::Ptr(state)];
    Ok(Launch { kernel: Kernel::Argmax, grid: (u32_grid("batch", batch)?, 1, 1), block: 1024, args })
}

/// `out[i] = mean + std · normal(seed, i)` for `n` elements (`expanse_random_normal_*`): a
/// grid-stride loop over at most 4096 blocks.
pub(crate) fn random_normal(out: DevPtr, n: usize, seed: u64, mean: f32, std: f32) -> Launch {
    let grid = (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1);
    Launch { kernel: Kernel::RandomNormal, grid, block: 256, args: vec![Arg::Ptr(out), Arg::U64(n as u64), Arg::U64(seed), Arg::F32(mean), Arg::F32(std)] }
}

fn u32_grid(what: &str, blocks: usize) -> Result<u32> {
    match u32::try_from(blocks) {
        Ok(b) if b <= i32::MAX as u32 => Ok(b),
        _ => bail!("{what}: {blocks} blocks do not fit a CUDA grid"),
    }
}
