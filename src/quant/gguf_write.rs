//! Writing a GGUF file (llama.cpp's format, version 3): the header, the metadata, the tensor table,
//! then each tensor's bytes streamed in turn, aligned as `general.alignment` says.
//!
//! Written here rather than with candle's `gguf_file::write`, which needs every tensor in memory at
//! once as a `QTensor`, writes version 2 and always aligns to 32 bytes: an expanded 7B model is
//! written one tensor at a time from the source's map, in the source's alignment.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use super::gguf::{element_count, stored_bytes};
use crate::error::{Error, Result};

const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian
const VERSION: u32 = 3;
/// GGUF's alignment when the metadata sets none (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: usize = 32;

/// One tensor's entry in the table: its name, its dimensions outermost first (as candle lists
/// them; the file stores them innermost first) and its type.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlDType,
}

impl TensorEntry {
    /// Bytes of the tensor's data (whole blocks; `None` if the rows are not whole blocks).
    pub fn bytes(&self) -> Option<usize> {
        if !self.dims.last()?.is_multiple_of(self.ty.block_size()) {
            return None;
        }
        stored_bytes(element_count(&self.dims)?, self.ty.block_size(), self.ty.type_size())
    }
}

/// ggml's number for a type (`enum ggml_type`). candle keeps its own `to_u32` crate-private.
fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGUF's number for a metadata value's type (`enum gguf_type`).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// One metadata record as a GGUF stores it: the key, the value's type tag, the value.
pub fn encode_kv(key: &str, value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    put_string(&mut out, key);
    out.extend_from_slice(&value_type(value).to_le_bytes());
    put_value(&mut out, key, value)?;
    Ok(out)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends one value (without its type tag). An array's elements must share one type; an empty
/// array is written as an array of u32 (candle does not keep an empty array's element type).
fn put_value(out: &mut Vec<u8>, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, value_type);
            if items.iter().any(|i| value_type(i) != ty) {
                return Err(Error::Internal(format!("metadata key `{key}`: an array of mixed types")));
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item)?;
            }
        }
    }
    Ok(())
}

fn padding(at: usize, alignment: usize) -> usize {
    at.next_multiple_of(alignment) - at
}

/// A GGUF being written: [`GgufWriter::start`] writes everything before the data, then
/// [`GgufWriter::tensor`] takes each tensor's bytes in the table's order, and
/// [`GgufWriter::finish`] checks that every one came.
pub struct GgufWriter<W: Write> {
    out: W,
    /// Named in I/O errors.
    path: PathBuf,
    alignment: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header, the `metadata` records (each one key, type and value as a GGUF stores it:
    /// [`encode_kv`], or a record copied from another GGUF; in the order given) and the table of
    /// `tensors`, each tensor's data offset a multiple of `alignment` (which should be the metadata's
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`] when it sets none). I/O errors name `path`.
    pub fn start<R: AsRef<[u8]>>(mut out: W, path: &Path, metadata: &[R], tensors: &[TensorEntry], alignment: usize) -> Result<Self> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(Error::Internal(format!("GGUF alignment {alignment} is not a power of two")));
        }
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for record in metadata {
            head.extend_from_slice(record.as_ref());
        }
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for t in tensors {
            let size = t.bytes().ok_or_else(|| Error::Internal(format!("tensor `{}`: dims {:?} are not whole {:?} blocks", t.name, t.dims, t.ty)))?;
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in t.dims.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&type_id(t.ty).to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += size + padding(size, alignment);
            sizes.push(size);
        }
        head.resize(head.len() + padding(head.len(), alignment), 0);
        out.write_all(&head).map_err(|e| Error::io(path, e))?;
        Ok(GgufWriter { out, path: path.to_path_buf(), alignment, sizes, next: 0 })
    }

    /// Writes the next tensor's data, padded to the alignment. `bytes` must be as long as the
    /// table said.
    pub fn tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some(&size) = self.sizes.get(self.next) else {
            return Err(Error::Internal(format!("tensor `{name}`: more tensors written than the table lists")));
        };
        if bytes.len() != size {
            return Err(Error::Internal(format!("tensor `{name}`: {} bytes, the table says {size}", bytes.len())));
        }
        self.next += 1;
        let pad = vec![0u8; padding(size, self.alignment)];
        self.out.write_all(bytes).and_then(|()| self.out.write_all(&pad)).map_err(|e| Error::io(&self.path, e))
    }

    /// The writer back, once every tensor in the table has been written.
    pub fn finish(self) -> Result<W> {
        if self.next != self.sizes.len() {
            return Err(Error::Internal(format!("{} of {} tensors written", self.next, self.sizes.len())));
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;

    /// What is written reads back through candle's GGUF reader (an independent parser): every value
    /// with its type, every tensor's dims, type, offset (aligned) and bytes.
    #[test]
    fn a_written_file_reads_back_through_candles_reader() {
        let metadata = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("general.alignment".to_string(), Value::U32(64)),
            ("llama.block_count".to_string(), Value::U32(5)),
            ("x.i8".to_string(), Value::I8(-3)),
            ("x.f64".to_string(), Value::F64(0.1)),
            ("x.bool".to_string(), Value::Bool(true)),
            ("x.tokens".to_string(), Value::Array(vec![Value::String("<s>".into()), Value::String("▁hé".into())])),
            ("x.scores".to_string(), Value::Array(vec![Value::F32(-1.5), Value::F32(2.0)])),
        ];
        let tensors = vec![
            TensorEntry { name: "a".into(), dims: vec![3], ty: GgmlDType::F32 },
            TensorEntry { name: "b".into(), dims: vec![2, 64], ty: GgmlDType::Q8_0 },
            TensorEntry { name: "c".into(), dims: vec![1, 256], ty: GgmlDType::Q4K },
        ];
        let data: Vec<Vec<u8>> = tensors.iter().enumerate().map(|(i, t)| (0..t.bytes().unwrap()).map(|k| (k * 7 + i) as u8).collect()).collect();
        let records: Vec<Vec<u8>> = metadata.iter().map(|(k, v)| encode_kv(k, v).unwrap()).collect();
        let mut w = GgufWriter::start(Vec::new(), Path::new("t.gguf"), &records, &tensors, 64).unwrap();
        for (t, d) in tensors.iter().zip(&data) {
            w.tensor(&t.name, d).unwrap();
        }
        let file = w.finish().unwrap();
        let c = Content::read(&mut std::io::Cursor::new(&file)).unwrap();
        assert_eq!(c.metadata.len(), metadata.len());
        for (k, v) in &metadata {
            assert_eq!(format!("{:?}", c.metadata[k]), format!("{v:?}"), "{k}");
        }
        assert_eq!(c.tensor_data_offset % 64, 0);
        for (t, d) in tensors.iter().zip(&data) {
            let info = &c.tensor_infos[&t.name];
            assert_eq!((info.shape.dims(), info.ggml_dtype, info.offset % 64), (t.dims.as_slice(), t.ty, 0), "{}", t.name);
            let at = (c.tensor_data_offset + info.offset) as usize;
            assert_eq!(&file[at..at + d.len()], d.as_slice(), "{}", t.name);
        }
        assert_eq!(file.len() % 64, 0, "the last tensor is padded too, as gguf-py writes it");
    }

    #[test]
    fn wrong_sizes_and_counts_are_errors_not_a_corrupt_file() {
        let tensors = vec![TensorEntry { name: "a".into(), dims: vec![4], ty: GgmlDType::F32 }];
        let mut w = GgufWriter::start(Vec::new(), Path::new("t.gguf"), &[] as &[Vec<u8>], &tensors, 32).unwrap();
        assert!(w.tensor("a", &[0u8; 15]).is_err());
        w.tensor("a", &[0u8; 16]).unwrap();
        assert!(w.tensor("b", &[0u8; 16]).is_err());
        let short = GgufWriter::start(Vec::new(), Path::new("t.gguf"), &[] as &[Vec<u8>], &tensors, 32).unwrap();
        assert!(short.finish().is_err());
        let bad = [TensorEntry { name: "q".into(), dims: vec![2, 48], ty: GgmlDType::Q8_0 }];
        assert!(GgufWriter::start(Vec::new(), Path::new("t.gguf"), &[] as &[Vec<u8>], &bad, 32).is_err(), "rows of 48 are not whole 32-value blocks");
        assert!(GgufWriter::start(Vec::new(), Path::new("t.gguf"), &[] as &[Vec<u8>], &tensors, 24).is_err());
    }
}
