//! Quantized weight formats (GGML's block types, as GGUF files and llama.cpp store them): which ones
//! expanse reads and writes, quantizing a weight into one the way llama-quantize does (no importance
//! matrix), and what each costs in bytes. The layouts, kernels and legacy quantizers are candle's
//! `quantized` (ported from ggml-quants.c); the K-quant quantizers are [`kquants`]' port of ggml's
//! current ones. This module is where the model, the loaders and the kernels meet them
//! ([`QMatrix`]: a quantized projection as the model holds it, shared by every copy of its layer).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

pub mod cpu_product;
pub mod gguf;
pub mod gguf_write;
mod kquants;

/// A quantized weight type: what `--quant` will take and what a GGUF tensor may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantType {
    pub const ALL: [QuantType; 8] =
        [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0, QuantType::Q5_1, QuantType::Q4K, QuantType::Q5K, QuantType::Q6K];

    /// llama.cpp's name (`q8_0`, `q4_k`), as `--quant` and GGUF tools spell it.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q5_0 => "q5_0",
            QuantType::Q5_1 => "q5_1",
            QuantType::Q4K => "q4_k",
            QuantType::Q5K => "q5_k",
            QuantType::Q6K => "q6_k",
        }
    }

    /// Parses a type name (any case); `flag` names the flag or file key it came from in the error.
    pub fn parse(s: &str, flag: &str) -> Result<QuantType> {
        let lower = s.trim().to_ascii_lowercase();
        QuantType::ALL.into_iter().find(|q| q.name() == lower).ok_or_else(|| {
            let names: Vec<&str> = QuantType::ALL.iter().map(|q| q.name()).collect();
            Error::flag(flag, format!("`{s}`: expected one of {}", names.join(", ")))
        })
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q5_1 => GgmlDType::Q5_1,
            QuantType::Q4K => GgmlDType::Q4K,
            QuantType::Q5K => GgmlDType::Q5K,
            QuantType::Q6K => GgmlDType::Q6K,
        }
    }

    /// The CUDA kernels of this type (`kernels/cuda/gemv_quant.cu`).
    #[cfg(any(feature = "cuda", test))]
    pub(crate) fn kernel(self) -> crate::kernels::launch::QuantKernel {
        use crate::kernels::launch::QuantKernel as K;
        match self {
            QuantType::Q8_0 => K::Q8_0,
            QuantType::Q4_0 => K::Q4_0,
            QuantType::Q4_1 => K::Q4_1,
            QuantType::Q5_0 => K::Q5_0,
            QuantType::Q5_1 => K::Q5_1,
            QuantType::Q4K => K::Q4K,
            QuantType::Q5K => K::Q5K,
            QuantType::Q6K => K::Q6K,
        }
    }

    /// Values per block: a row's length must be a multiple of it.
    pub fn block_values(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block (scales and quants).
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Bytes of a `rows × cols` weight in this type (`cols` a multiple of the block).
    pub fn bytes_for(self, rows: usize, cols: usize) -> usize {
        rows * cols / self.block_values() * self.block_bytes()
    }

    /// Bits per weight, scales included (8.5 for Q8_0, 4.5 for Q4_K).
    pub fn bits_per_weight(self) -> f64 {
        8.0 * self.block_bytes() as f64 / self.block_values() as f64
    }

    /// The type a `cols`-wide weight asked to be `self` gets: itself when rows are whole blocks, else
    /// llama-quantize's fallback (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), else None (kept unquantized;
    /// llama.cpp keeps such a tensor in F16).
    pub fn for_width(self, cols: usize) -> Option<QuantType> {
        let fallback = match self {
            QuantType::Q4K => QuantType::Q5_0,
            QuantType::Q5K => QuantType::Q5_1,
            QuantType::Q6K => QuantType::Q8_0,
            q => q,
        };
        [self, fallback].into_iter().find(|q| cols.is_multiple_of(q.block_values()))
    }
}

/// `w` (`[rows, cols]`, any float dtype, on the CPU) quantized to `q`, block by block along each row as
/// llama-quantize does. `name` (the tensor's) goes into the error when a row is not whole blocks:
/// llama.cpp then keeps such a tensor in another type, which the caller chooses.
pub fn quantize(name: &str, w: &Tensor, q: QuantType) -> Result<QTensor> {
    let (rows, cols) = w.dims2()?;
    from_bytes(name, &quantize_to_bytes(name, w, q)?, rows, cols, q)
}

/// [`quantize`]'s blocks as bytes (GGUF's bytes for that tensor).
pub fn quantize_to_bytes(name: &str, w: &Tensor, q: QuantType) -> Result<Vec<u8>> {
    let cols = w.dims().last().copied().unwrap_or(0);
    if w.rank() != 2 || !cols.is_multiple_of(q.block_values()) {
        return Err(Error::internal(format!(
            "{name}: shape {:?} cannot be {}: rows must be a whole number of {}-value blocks",
            w.dims(),
            q.name(),
            q.block_values()
        )));
    }
    let w = w.to_device(&Device::Cpu)?;
    // Every type stores its block scales (and mins) in f16: past f16's range a scale would be ±Inf
    // and the block read back as NaN or zeros, silently. Within it no scale overflows.
    let at = |t: Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?) };
    let (hi, lo) = (at(w.max_all()?)?, at(w.min_all()?)?);
    let amax = if hi.abs() >= lo.abs() { hi.abs() } else { lo.abs() };
    // Written so that a NaN extreme (max/min need not skip it) is refused too.
    if !(hi.abs() <= F16_MAX && lo.abs() <= F16_MAX) {
        return Err(Error::flag(
            "--quant",
            format!("tensor `{name}` holds a weight of magnitude {amax:e}, beyond ±{F16_MAX} where {} stores its block scales; run it unquantized", q.name()),
        ));
    }
    let rows = w.dim(0)?;
    // Blocks never cross a row, so row chunks quantized in parallel, each into its place, are the
    // same bytes (a 7B model's projections: minutes on one thread → a share per core). Chunks of at
    // most 256 rows are widened to f32 one at a time per thread, and the output is allocated once:
    // no f32 copy of the weight and no second copy of its blocks is held (the load's peak memory).
    let chunk = rows.div_ceil(4 * rayon::current_num_threads()).clamp(1, 256);
    let row_bytes = q.bytes_for(1, cols);
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_mut(chunk * row_bytes).enumerate().try_for_each(|(i, dst)| -> Result<()> {
        let start = i * chunk;
        dst.copy_from_slice(&quantize_rows(&w.narrow(0, start, dst.len() / row_bytes)?, q)?);
        Ok(())
    })?;
    Ok(out)
}

/// Rows of whole blocks quantized to `q`. The K-quants are [`kquants`]' port of ggml's current
/// reference quantizers (candle's are an older algorithm whose bytes differ from llama-quantize's);
/// the legacy types are candle's, which already write llama.cpp's bytes.
fn quantize_rows(w: &Tensor, q: QuantType) -> Result<Vec<u8>> {
    let k = match q {
        QuantType::Q4K => kquants::KQuant::Q4K,
        QuantType::Q5K => kquants::KQuant::Q5K,
        QuantType::Q6K => kquants::KQuant::Q6K,
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 => {
            // candle quantizes a tensor's storage from its start, whatever the view's offset, and
            // (debug builds) asserts that the storage is the view's size: a view (a chunk of rows, a
            // narrowed weight — at offset 0 too) is copied into storage of its own first. The copy is
            // a chunk of at most 256 rows (`quantize_to_bytes`).
            let w = w.force_contiguous()?;
            return bytes(&QTensor::quantize(&w, q.ggml())?);
        }
    };
    let x = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(q.bytes_for(w.dim(0)?, w.dim(1)?));
    kquants::quantize_into(k, &x, &mut out);
    Ok(out)
}

/// The blocks of `t` as they are stored (GGUF's bytes for that tensor).
pub fn bytes(t: &QTensor) -> Result<Vec<u8>> {
    Ok(t.data()?.into_owned())
}

/// A `[rows, cols]` tensor of type `q` from its stored blocks (a GGUF tensor's bytes), checked for size.
pub fn from_bytes(name: &str, data: &[u8], rows: usize, cols: usize, q: QuantType) -> Result<QTensor> {
    if !cols.is_multiple_of(q.block_values()) || data.len() != q.bytes_for(rows, cols) {
        return Err(Error::internal(format!(
            "{name}: {} bytes of {} for [{rows}, {cols}]; expected {} (whole {}-value blocks of {} bytes)",
            data.len(),
            q.name(),
            q.bytes_for(rows, cols),
            q.block_values(),
            q.block_bytes()
        )));
    }
    let t = QTensor::new(QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, q.ggml())?, (rows, cols))?;
    Ok(t)
}

/// f16's largest finite value: the bound on any weight a quantized type can scale.
const F16_MAX: f32 = 65504.0;

/// A quantized weight matrix `[rows, cols]` as a model holds it: the blocks on the model's device
/// behind an `Arc` (every copy of a layer shares its source's), or a range of its rows (q, k and v
/// are rows of the stacked qkv projection, as in the dense model). A stack may hold runs of rows in
/// different types (a Q4_K_M file's q/k in q4_k beside v in q6_k): each run is a part, multiplied
/// on its own, the products side by side.
#[derive(Debug, Clone)]
pub struct QMatrix {
    parts: Arc<[Part]>,
    rows: Range<usize>,
}

/// Rows `start..start + blocks' rows` of a stack, all of type `ty`.
#[derive(Debug)]
struct Part {
    blocks: Blocks,
    ty: QuantType,
    start: usize,
}

impl Part {
    fn rows(&self) -> Range<usize> {
        self.start..self.start + self.blocks.dims().0
    }
}

/// A quantized matrix's blocks as candle holds them. On the CPU we keep candle's block storage and
/// multiply it ourselves ([`cpu_product`]: activations rounded as llama.cpp's x86 builds round them):
/// `QMatMul` would also repack Q4_K into tiles beside the original blocks on first use (candle 0.11,
/// x86), doubling what the weights occupy. Elsewhere a `QTensor` (candle's device kernels).
enum Blocks {
    Cpu { blocks: Box<dyn QuantizedType>, rows: usize, cols: usize },
    Device(Arc<QTensor>),
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rows, cols) = self.dims();
        write!(f, "Blocks([{rows}, {cols}])")
    }
}

impl Blocks {
    fn dims(&self) -> (usize, usize) {
        match self {
            Blocks::Cpu { rows, cols, .. } => (*rows, *cols),
            Blocks::Device(t) => t.shape().dims2().unwrap_or((0, 0)),
        }
    }

    /// `x` `[m, cols]` times the blocks' transpose, `[m, rows]` in f32, for blocks on a device (the
    /// CPU's go through [`QMatrix::product_f32`]); `order` says whether each row must get the bits it
    /// gets alone.
    fn product(&self, x: &Tensor, order: cpu_product::Rows) -> candle_core::Result<Tensor> {
        match self {
            Blocks::Device(_) if order == cpu_product::Rows::Invariant && x.dim(0)? > 1 => {
                // A device's matmul may choose its kernel by the row count: one row at a time.
                let rows = (0..x.dim(0)?).map(|i| self.product(&x.narrow(0, i, 1)?, order)).collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
            Blocks::Device(t) => QMatMul::QTensor(t.clone()).forward(&x.contiguous()?),
            Blocks::Cpu { .. } => candle_core::bail!("quantized blocks on the CPU multiply through product_f32"),
        }
    }

    /// Where the blocks lie: a host address for blocks on the CPU, a device address for blocks on
    /// CUDA (kernels reading them in place: the fused decode step's, or their emulator's).
    fn address(&self) -> Result<u64> {
        match self {
            Blocks::Cpu { blocks, .. } => Ok(blocks.as_ptr() as u64),
            Blocks::Device(t) => Ok(t.device_ptr()? as u64),
        }
    }

    fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        match self {
            Blocks::Cpu { blocks, .. } => {
                // SAFETY: `as_ptr` and `storage_size_in_bytes` describe the blocks' own allocation,
                // alive as long as `self` (candle's `QStorage::data` reads it the same way).
                Ok(Cow::Borrowed(unsafe { std::slice::from_raw_parts(blocks.as_ptr(), blocks.storage_size_in_bytes()) }))
            }
            Blocks::Device(t) => Ok(t.data()?),
        }
    }

    fn dequantize(&self) -> Result<Tensor> {
        match self {
            Blocks::Cpu { blocks, rows, cols } => match blocks.dequantize(rows * cols)? {
                candle_core::CpuStorage::F32(v) => Ok(Tensor::from_vec(v, (*rows, *cols), &Device::Cpu)?),
                _ => Err(Error::internal("dequantized blocks came back in another dtype than f32")),
            },
            Blocks::Device(t) => Ok(t.dequantize(&Device::Cpu)?),
        }
    }
}

impl QMatrix {
    /// `w` (`[rows, cols]`, any float dtype and device) quantized to `ty` on the CPU, as llama-quantize
    /// does, and its blocks placed on `device`.
    pub fn quantize(name: &str, w: &Tensor, ty: QuantType, device: &Device) -> Result<QMatrix> {
        let (rows, cols) = w.dims2()?;
        QMatrix::from_bytes(name, &quantize_to_bytes(name, w, ty)?, rows, cols, ty, device)
    }

    /// A `[rows, cols]` matrix of type `ty` from its stored blocks, placed on `device`.
    pub fn from_bytes(name: &str, data: &[u8], rows: usize, cols: usize, ty: QuantType, device: &Device) -> Result<QMatrix> {
        QMatrix::stacked(name, &[(data, rows, ty)], cols, device)
    }

    /// The rows of `runs` (each its stored blocks, its row count and type), top to bottom, as one
    /// matrix of `cols` columns on `device`; a run of the same type as the one above joins it.
    pub fn stacked(name: &str, runs: &[(&[u8], usize, QuantType)], cols: usize, device: &Device) -> Result<QMatrix> {
        // Runs of one type join; a run alone is read where it lies (a layer's blocks are not copied
        // once more on their way into candle's storage).
        let mut merged: Vec<(Cow<'_, [u8]>, usize, QuantType)> = Vec::new();
        for &(data, rows, ty) in runs {
            if !cols.is_multiple_of(ty.block_values()) || data.len() != ty.bytes_for(rows, cols) {
                return Err(Error::internal(format!("{name}: {} bytes of {} for [{rows}, {cols}]", data.len(), ty.name())));
            }
            match merged.last_mut() {
                Some((d, r, t)) if *t == ty => {
                    d.to_mut().extend_from_slice(data);
                    *r += rows;
                }
                // candle reads the bytes as its block types (aligned to 2, q8_K's to 4): a slice
                // that is not is copied (a GGUF's tensors are aligned; a caller's slice may not be).
                _ if data.as_ptr().align_offset(8) != 0 => merged.push((Cow::Owned(data.to_vec()), rows, ty)),
                _ => merged.push((Cow::Borrowed(data), rows, ty)),
            }
        }
        let (mut parts, mut start) = (Vec::with_capacity(merged.len()), 0);
        for (data, rows, ty) in merged {
            let blocks = match QStorage::from_data(Cow::Borrowed(&data), device, ty.ggml())? {
                QStorage::Cpu(blocks) => Blocks::Cpu { blocks, rows, cols },
                storage => Blocks::Device(Arc::new(QTensor::new(storage, (rows, cols))?)),
            };
            parts.push(Part { blocks, ty, start });
            start += rows;
        }
        if parts.is_empty() {
            return Err(Error::internal(format!("{name}: a quantized matrix of no rows")));
        }
        Ok(QMatrix { parts: parts.into(), rows: 0..start })
    }

    /// Rows `start..start + len` of this matrix, sharing its blocks.
    pub fn rows(&self, start: usize, len: usize) -> Result<QMatrix> {
        let end = start + len;
        if self.rows.start + end > self.rows.end {
            return Err(Error::internal(format!("rows {start}..{end} of a {}-row quantized matrix", self.rows.len())));
        }
        Ok(QMatrix { parts: self.parts.clone(), rows: self.rows.start + start..self.rows.start + end })
    }

    /// Each part this matrix's rows reach into, with the rows of it they take (in the stack's rows).
    fn spans(&self) -> impl Iterator<Item = (&Part, Range<usize>)> {
        self.parts.iter().filter_map(|p| {
            let r = p.rows();
            let span = r.start.max(self.rows.start)..r.end.min(self.rows.end);
            (span.start < span.end).then_some((p, span))
        })
    }

    /// `(rows, cols)` of this matrix (of the view, for a range of rows).
    pub fn dims(&self) -> (usize, usize) {
        (self.rows.len(), self.cols())
    }

    fn cols(&self) -> usize {
        self.parts[0].blocks.dims().1
    }

    /// The type of the first row (a stack of mixed types: `types` has them all).
    pub fn quant_type(&self) -> QuantType {
        self.spans().next().map_or(self.parts[0].ty, |(p, _)| p.ty)
    }

    /// Each run of rows' type and length, top to bottom.
    pub fn types(&self) -> Vec<(QuantType, usize)> {
        self.spans().map(|(p, r)| (p.ty, r.len())).collect()
    }

    /// Bytes of this matrix's blocks (of its rows, for a view).
    pub fn bytes(&self) -> usize {
        self.spans().map(|(p, r)| p.ty.bytes_for(r.len(), self.cols())).sum()
    }

    /// Identity of the blocks behind this matrix (views and copies of one matrix share it).
    pub fn storage_id(&self) -> usize {
        Arc::as_ptr(&self.parts).cast::<u8>() as usize
    }

    /// Bytes of the whole matrix this one is (a view of).
    pub fn storage_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.ty.bytes_for(p.rows().len(), self.cols())).sum()
    }

    /// `x Wᵀ` over the last dimension of `x`, in `x`'s dtype (llama.cpp's arithmetic through candle:
    /// the activations are quantized to 8 bits per block, products summed in f32), each part's product
    /// beside the next. A view of some rows computes its parts' whole products and keeps its columns:
    /// views run only off the hot path.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_ordered(x, cpu_product::Rows::Fastest)
    }

    /// [`QMatrix::forward`] of `x` `[m, cols]` where each row's outputs are the bits it gets alone
    /// (decode rows of several sequences).
    pub fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_ordered(x, cpu_product::Rows::Invariant)
    }

    fn forward_ordered(&self, x: &Tensor, order: cpu_product::Rows) -> candle_core::Result<Tensor> {
        let (lead, _) = x.dims().split_at(x.rank() - 1);
        let x2 = x.reshape(((), self.cols()))?;
        if self.on_cpu() {
            let m = x2.dim(0)?;
            let lhs = x2.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut dst = vec![0f32; m * self.rows.len()];
            self.product_f32(&lhs, m, &mut dst, order).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let y = Tensor::from_vec(dst, (m, self.rows.len()), &Device::Cpu)?;
            return y.to_dtype(x.dtype())?.reshape([lead, &[self.rows.len()]].concat());
        }
        let mut ys = Vec::with_capacity(self.parts.len());
        for (p, span) in self.spans() {
            let y = p.blocks.product(&x2, order)?;
            ys.push(if span == p.rows() { y } else { y.narrow(1, span.start - p.start, span.len())? });
        }
        let y = if ys.len() == 1 { ys.remove(0) } else { Tensor::cat(&ys, 1)? };
        y.to_dtype(x.dtype())?.reshape([lead, &[self.rows.len()]].concat())
    }

    /// Whether the blocks lie on the CPU (then [`QMatrix::product_f32`] multiplies them).
    pub fn on_cpu(&self) -> bool {
        matches!(self.parts[0].blocks, Blocks::Cpu { .. })
    }

    /// `dst[m, rows] = lhs[m, cols] · Wᵀ` in f32, for blocks on the CPU: each part's product (our
    /// tiles, the activations rounded as llama.cpp's x86 builds round them) in its columns. The
    /// reference forward pass and the fused decode step both multiply here. `order` says whether each
    /// row must get the bits it gets alone.
    pub(crate) fn product_f32(&self, lhs: &[f32], m: usize, dst: &mut [f32], order: cpu_product::Rows) -> Result<()> {
        let (rows, cols) = self.dims();
        if lhs.len() != m * cols || dst.len() != m * rows {
            return Err(Error::internal(format!("quantized product of {} values by [{rows}, {cols}] into {}", lhs.len(), dst.len())));
        }
        for (p, span) in self.spans() {
            let Blocks::Cpu { blocks, rows: part_rows, .. } = &p.blocks else {
                return Err(Error::internal("a quantized matrix with blocks on the CPU and on a device"));
            };
            // The span's columns in dst, and in the part's own product.
            let (at, from) = (span.start - self.rows.start, span.start - p.start);
            if m == 1 && span == p.rows() {
                // Decode: the part's outputs are a slice of the row.
                cpu_product::matmul_t(blocks.as_ref(), (1, cols, *part_rows), lhs, &mut dst[at..at + part_rows], order)?;
                continue;
            }
            // A prompt, or a view of some of a part's rows: the whole part's product, the span's
            // columns kept (views run only off the hot path: the steps multiply whole stacks).
            let mut part = vec![0f32; m * part_rows];
            cpu_product::matmul_t(blocks.as_ref(), (m, cols, *part_rows), lhs, &mut part, order)?;
            for (d, y) in dst.chunks_mut(rows).zip(part.chunks(*part_rows)) {
                d[at..at + span.len()].copy_from_slice(&y[from..from + span.len()]);
            }
        }
        // Quantizing the activations drops a NaN or ±Inf (the block's max skips NaN, which then
        // casts to 0): a row holding one gets NaN, as a dense product would give.
        for (x, y) in lhs.chunks(cols).zip(dst.chunks_mut(rows)) {
            if x.iter().any(|v| !v.is_finite()) {
                y.fill(f32::NAN);
            }
        }
        Ok(())
    }

    /// The stored blocks of this matrix's rows (a row is whole blocks, so a view's rows are a slice).
    pub fn row_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.bytes());
        for (p, span) in self.spans() {
            let per_row = p.ty.bytes_for(1, self.cols());
            out.extend_from_slice(&p.blocks.bytes()?[(span.start - p.start) * per_row..(span.end - p.start) * per_row]);
        }
        Ok(out)
    }

    /// Whether two matrices hold the same values: the same types, shape and blocks.
    pub fn same_values(&self, other: &QMatrix) -> Result<bool> {
        if self.types() != other.types() || self.dims() != other.dims() {
            return Ok(false);
        }
        Ok((self.storage_id() == other.storage_id() && self.rows == other.rows) || self.row_bytes()? == other.row_bytes()?)
    }

    /// The values, dequantized to f32 on the CPU (`[rows, cols]`).
    pub fn dequantize(&self) -> Result<Tensor> {
        let parts = self.spans().map(|(p, span)| Ok(p.blocks.dequantize()?.narrow(0, span.start - p.start, span.len())?)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// One run of a matrix's rows of one type and where its blocks lie (`QMatrix::block_runs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRun {
    pub ty: QuantType,
    /// The run's first row, in the matrix's (the view's) rows.
    pub first_row: usize,
    pub rows: usize,
    /// Address of the first row's blocks: on the host for a matrix on the CPU, on the device for one
    /// on CUDA. Valid while the matrix (or a copy sharing its blocks) lives.
    pub addr: u64,
}

impl QMatrix {
    /// Each run of rows of one type, top to bottom, with the address of its blocks: what a kernel
    /// reading the blocks in place needs (a row is whole blocks, so a run's rows are contiguous).
    pub fn block_runs(&self) -> Result<Vec<BlockRun>> {
        self.spans()
            .map(|(p, span)| {
                let skipped = (span.start - p.start) * p.ty.bytes_for(1, self.cols());
                Ok(BlockRun { ty: p.ty, first_row: span.start - self.rows.start, rows: span.len(), addr: p.blocks.address()? + skipped as u64 })
            })
            .collect()
    }
}

/// Bytes of the distinct quantized matrices behind `matrices` (views and copies of one count once).
pub fn distinct_bytes<'a>(matrices: impl IntoIterator<Item = &'a QMatrix>) -> usize {
    let mut seen = std::collections::HashMap::new();
    for m in matrices {
        seen.insert(m.storage_id(), m.storage_bytes());
    }
    seen.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn sizes_are_llama_cpps() {
        // ggml's block sizes: Q8_0 34 bytes per 32, Q4_K 144 per 256, Q6_K 210 per 256.
        assert_eq!((QuantType::Q8_0.block_values(), QuantType::Q8_0.block_bytes()), (32, 34));
        assert_eq!((QuantType::Q4K.block_values(), QuantType::Q4K.block_bytes()), (256, 144));
        assert_eq!((QuantType::Q6K.block_values(), QuantType::Q6K.block_bytes()), (256, 210));
        assert_eq!(QuantType::Q4K.bits_per_weight(), 4.5);
        // OpenChat's gate/up stack (28672 × 4096) in Q4_K: 66 MB, against 235 MB in bf16.
        assert_eq!(QuantType::Q4K.bytes_for(28672, 4096), 28672 * 4096 / 256 * 144);
        for q in QuantType::ALL {
            assert_eq!(QuantType::parse(&q.name().to_uppercase(), "--quant").unwrap(), q);
        }
        let e = QuantType::parse("q3_x", "--quant").unwrap_err().to_string();
        assert!(e.contains("--quant") && e.contains("q4_k"), "{e}");
    }

    #[test]
    fn refuses_rows_that_are_not_whole_blocks_naming_the_tensor() {
        let w = Tensor::zeros((4, 96), DType::F32, &Device::Cpu).unwrap();
        assert!(quantize("w", &w, QuantType::Q8_0).is_ok());
        let e = quantize("model.layers.0.mlp.down_proj.weight", &w, QuantType::Q4K).unwrap_err().to_string();
        assert!(e.contains("down_proj") && e.contains("256"), "{e}");
        let e = from_bytes("t", &[0u8; 33], 1, 32, QuantType::Q8_0).unwrap_err().to_string();
        assert!(e.contains("33 bytes") && e.contains("expected 34"), "{e}");
    }

    /// A zero projection (an inserted block's o_proj/down_proj) quantizes to blocks that read back as
    /// exact zeros, in every type: transparency survives quantization.
    #[test]
    fn zeros_stay_exact_zeros() {
        for q in QuantType::ALL {
            let w = Tensor::zeros((3, 512), DType::BF16, &Device::Cpu).unwrap();
            let t = quantize("zero", &w, q).unwrap();
            let back = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(back.iter().all(|&x| x == 0.0), "{}: {:?}", q.name(), &back[..8]);
            assert_eq!(bytes(&t).unwrap().len(), q.bytes_for(3, 512));
        }
    }

    /// A stack of two types (a Q4_K_M file's q/k beside v) multiplies as each part alone, side by
    /// side, on fresh random inputs; its views, bytes and dequantized values are the parts'.
    #[test]
    fn a_stack_of_mixed_types_is_its_parts_side_by_side() {
        let cpu = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (6, 64), &cpu).unwrap();
        let b = Tensor::randn(0f32, 1., (2, 64), &cpu).unwrap();
        let (qa, qb) = (QMatrix::quantize("a", &a, QuantType::Q5_0, &cpu).unwrap(), QMatrix::quantize("b", &b, QuantType::Q8_0, &cpu).unwrap());
        let (ba, bb) = (qa.row_bytes().unwrap(), qb.row_bytes().unwrap());
        let m = QMatrix::stacked("ab", &[(&ba, 6, QuantType::Q5_0), (&bb, 2, QuantType::Q8_0)], 64, &cpu).unwrap();
        assert_eq!((m.dims(), m.types()), ((8, 64), vec![(QuantType::Q5_0, 6), (QuantType::Q8_0, 2)]));
        assert_eq!(m.bytes(), ba.len() + bb.len());
        // Decode's one row (each part's outputs written in place, the second part's at column 6) and
        // a prompt's three, into outputs that start as NaN: a column no part wrote fails.
        for rows in [1, 3] {
            let x = Tensor::randn(0f32, 1., (rows, 64), &cpu).unwrap();
            let want = Tensor::cat(&[qa.forward(&x).unwrap(), qb.forward(&x).unwrap()], 1).unwrap();
            assert_eq!(m.forward(&x).unwrap().to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap(), "{rows} rows");
            let lhs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (start, len) in [(0, 8), (4, 4), (6, 2), (1, 3)] {
                let mut dst = vec![f32::NAN; rows * len];
                m.rows(start, len).unwrap().product_f32(&lhs, rows, &mut dst, cpu_product::Rows::Invariant).unwrap();
                assert_eq!(dst, want.narrow(1, start, len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{rows} rows, view {start}+{len}");
            }
        }
        let x = Tensor::randn(0f32, 1., (3, 64), &cpu).unwrap();
        let want = Tensor::cat(&[qa.forward(&x).unwrap(), qb.forward(&x).unwrap()], 1).unwrap();
        // A view across the boundary: rows 4..8, two of each type.
        let v = m.rows(4, 4).unwrap();
        assert_eq!(v.types(), [(QuantType::Q5_0, 2), (QuantType::Q8_0, 2)]);
        assert_eq!(v.forward(&x).unwrap().to_vec2::<f32>().unwrap(), want.narrow(1, 4, 4).unwrap().to_vec2::<f32>().unwrap());
        let deq = Tensor::cat(&[qa.dequantize().unwrap(), qb.dequantize().unwrap()], 0).unwrap();
        assert_eq!(v.dequantize().unwrap().to_vec2::<f32>().unwrap(), deq.narrow(0, 4, 4).unwrap().to_vec2::<f32>().unwrap());
        assert_eq!(v.row_bytes().unwrap(), [&ba[ba.len() * 4 / 6..], &bb[..]].concat());
        // Its runs' addresses (what the CUDA step reads in place): rows 4 and 5 of the Q5_0 part
        // (its blocks four rows in), then the Q8_0 part from its start, at columns 0 and 2.
        let runs = v.block_runs().unwrap();
        assert_eq!(runs.iter().map(|r| (r.ty, r.first_row, r.rows)).collect::<Vec<_>>(), [(QuantType::Q5_0, 0, 2), (QuantType::Q8_0, 2, 2)]);
        for (r, want) in runs.iter().zip([&ba[ba.len() * 4 / 6..], &bb[..]]) {
            // SAFETY: the run's blocks are `want.len()` bytes of m's CPU storage, alive with `m`.
            let got = unsafe { std::slice::from_raw_parts(r.addr as *const u8, want.len()) };
            assert_eq!(got, want, "{:?}", r.ty);
        }
        assert!(!v.same_values(&m.rows(0, 4).unwrap()).unwrap() && v.same_values(&v.clone()).unwrap());
        // Runs of one type join: one part, one product.
        let one = QMatrix::stacked("aa", &[(&ba, 6, QuantType::Q5_0), (&ba, 6, QuantType::Q5_0)], 64, &cpu).unwrap();
        assert_eq!(one.types(), [(QuantType::Q5_0, 12)]);
    }
}
