//! Finding a checkpoint (local folder or Hugging Face cache/hub) and reading its safetensors files.
//! The only module that touches hf-hub and safetensors.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::staging::{OutKind, Staging, Target};

/// The files of one checkpoint, wherever they came from.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named: a folder or a hub id.
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Resolves `--model`: an existing folder, else a hub id looked up in the Hugging Face cache
/// (`HF_HOME` honoured) and downloaded when missing and the hub can be reached.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<ModelFiles> {
    if model.is_empty() {
        return Err(Error::flag("--model", "is empty: expected a checkpoint folder or a Hugging Face hub id"));
    }
    let path = Path::new(model);
    // Anything present at the path, even a dangling or looping symlink, makes it a local path.
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
            if !meta.is_dir() {
                if crate::quant::gguf::is_gguf_path(path) && meta.is_file() {
                    return Ok(gguf_files(model, path));
                }
                return Err(Error::bad_file(path, "--model must be a folder holding config.json and *.safetensors"));
            }
            if let Some(r) = revision {
                // A folder has one version: taking it silently would not be the revision asked for.
                return Err(Error::flag("--revision", format!("`{r}` names a hub revision, but --model {model} is a local folder")));
            }
            return local_files(model, path);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path, e)),
        Err(_) => {}
    }
    if !looks_like_hub_id(model) {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder (and not a hub id)")));
    }
    hub_files(model, revision.unwrap_or("main"))
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// `dir/name` when it is a regular file; None when nothing is there; an error naming what is wrong
/// with anything else there (a folder, a FIFO, a symlink loop, no permission). A FIFO is refused
/// before it is opened: opening one waits for a writer, maybe forever.
fn optional(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let p = dir.join(name);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(Some(p)),
        Ok(m) => Err(Error::bad_file(&p, format!("is a {}, expected a file", file_kind(&m)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(&p).is_err() => Ok(None),
        Err(e) => Err(Error::io(&p, e)),
    }
}

/// What a file system entry is, in words, for messages (`is a FIFO, expected a file`).
pub fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO (named pipe)";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "device";
        }
    }
    if t.is_dir() {
        "folder"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "broken symbolic link"
    } else {
        "special file"
    }
}

/// A GGUF file is the whole checkpoint: config, weights, tokenizer and chat template in one file.
fn gguf_files(name: &str, path: &Path) -> ModelFiles {
    let one = Some(path.to_path_buf());
    ModelFiles {
        name: name.to_string(),
        dir: path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        config: path.to_path_buf(),
        weights: vec![path.to_path_buf()],
        tokenizer: one.clone(),
        tokenizer_config: one,
        generation_config: None,
    }
}

fn local_files(name: &str, dir: &Path) -> Result<ModelFiles> {
    let config =
        optional(dir, "config.json")?.ok_or_else(|| Error::bad_file(dir.join("config.json"), "not found (--model must be a folder holding config.json)"))?;
    let weights = if let Some(index) = optional(dir, INDEX)? {
        let listed = |s: String| optional(dir, &s)?.ok_or_else(|| Error::bad_file(dir.join(&s), format!("not found (listed in {INDEX})")));
        shard_names(&index)?.into_iter().map(listed).collect::<Result<_>>()?
    } else if let Some(single) = optional(dir, SINGLE)? {
        vec![single]
    } else {
        return Err(Error::bad_file(dir, format!("neither {SINGLE} nor {INDEX} found")));
    };
    Ok(ModelFiles {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        config,
        weights,
        tokenizer: optional(dir, "tokenizer.json")?,
        tokenizer_config: optional(dir, "tokenizer_config.json")?,
        generation_config: optional(dir, "generation_config.json")?,
    })
}

/// The shard file names listed by a `model.safetensors.index.json`, in first-seen order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = crate::config::read_text(index)?;
    parse_index(&text, index)
}

/// Parses index text; `index` only names the file in errors.
pub fn parse_index(text: &str, index: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::bad_file(index, format!("invalid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::bad_file(index, "no `weight_map`"))?;
    let mut names: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| Error::bad_file(index, "`weight_map` values must be file names"))?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.contains("..") {
            return Err(Error::bad_file(index, format!("shard name `{file}` is not a plain file name")));
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    if names.is_empty() {
        return Err(Error::bad_file(index, "`weight_map` is empty"));
    }
    Ok(names)
}

fn hub_files(id: &str, revision: &str) -> Result<ModelFiles> {
    use hf_hub::{Cache, Repo, RepoType};
    let cache = Cache::from_env();
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let cached = cache.repo(repo.clone());
    if let Some(config) = cached.get("config.json") {
        return cached_files(id, &cached, config);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let hub_err = |msg: String| Error::Hub { id: id.to_string(), msg };
    if offline {
        return Err(hub_err(format!("not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set", cache.path().display())));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build().map_err(|e| hub_err(format!("cannot reach the hub: {e}")))?;
    let remote = api.repo(repo);
    let unreachable =
        |e: hf_hub::api::sync::ApiError| hub_err(format!("not in the Hugging Face cache ({}) and the hub cannot be reached: {e}", cache.path().display()));
    let config = remote.get("config.json").map_err(unreachable)?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let weights = match remote.get(INDEX) {
        Ok(index) => {
            let mut files = Vec::new();
            for shard in shard_names(&index)? {
                files.push(remote.get(&shard).map_err(unreachable)?);
            }
            files
        }
        Err(_) => vec![remote.get(SINGLE).map_err(unreachable)?],
    };
    Ok(ModelFiles {
        name: id.to_string(),
        dir,
        config,
        weights,
        tokenizer: remote.get("tokenizer.json").ok(),
        tokenizer_config: remote.get("tokenizer_config.json").ok(),
        generation_config: remote.get("generation_config.json").ok(),
    })
}

fn cached_files(id: &str, cached: &hf_hub::CacheRepo, config: PathBuf) -> Result<ModelFiles> {
    let missing = |f: &str| Error::Hub { id: id.to_string(), msg: format!("the cached snapshot lacks {f}") };
    let weights = if let Some(index) = cached.get(INDEX) {
        shard_names(&index)?.iter().map(|s| cached.get(s).ok_or_else(|| missing(s))).collect::<Result<Vec<_>>>()?
    } else {
        vec![cached.get(SINGLE).ok_or_else(|| missing(SINGLE))?]
    };
    Ok(ModelFiles {
        name: id.to_string(),
        dir: config.parent().map(Path::to_path_buf).unwrap_or_default(),
        config,
        weights,
        tokenizer: cached.get("tokenizer.json"),
        tokenizer_config: cached.get("tokenizer_config.json"),
        generation_config: cached.get("generation_config.json"),
    })
}

/// Where a tensor lives: which mapped file, its dtype, shape and byte range.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    file: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// Bytes the tensor takes in its file.
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

/// All tensors of a checkpoint, memory-mapped; tensors are read on demand.
pub struct Checkpoint {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: HashMap<String, TensorEntry>,
}

fn st_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I64 => DType::I64,
        _ => return None,
    })
}

fn to_st_dtype(d: DType) -> StDtype {
    match d {
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::U8 => StDtype::U8,
        DType::U32 => StDtype::U32,
        _ => StDtype::I64,
    }
}

/// The tensors listed in a safetensors file's header, with their byte ranges in `bytes` (the whole
/// file); `path` only names the file in errors.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<Vec<(String, TensorEntry)>> {
    let (n, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::bad_file(path, format!("{e} (not a valid safetensors file: truncated or corrupt)")))?;
    let base = 8 + n;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = st_dtype(info.dtype).ok_or_else(|| Error::bad_file(path, format!("tensor `{name}` has unsupported dtype {:?}", info.dtype)))?;
        let (s, e) = info.data_offsets;
        out.push((name, TensorEntry { file: 0, dtype, shape: info.shape.clone(), start: base + s, end: base + e }));
    }
    Ok(out)
}

impl Checkpoint {
    pub fn open(files: &[PathBuf]) -> Result<Checkpoint> {
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            // Only a regular file can be mapped; a FIFO would block the open itself.
            let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
            if !meta.is_file() {
                return Err(Error::bad_file(path, format!("is a {}, expected a safetensors file", file_kind(&meta))));
            }
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a checkpoint being rewritten underneath a running
            // process is outside what any inference engine can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            for (name, mut entry) in parse_header(&map, path)? {
                entry.file = i;
                // Two shards holding one tensor: which is the model's? (A map would keep the last.)
                if let Some(first) = entries.get(&name).map(|e: &TensorEntry| &files[e.file]) {
                    return Err(Error::bad_file(path, format!("tensor `{name}` is also in {}: a tensor may be in one shard only", first.display())));
                }
                entries.insert(name, entry);
            }
            maps.push(map);
        }
        Ok(Checkpoint { paths: files.to_vec(), maps, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// The file that holds `name` (or the first file, for errors about absent tensors).
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.entries.get(name).map_or(0, |e| e.file);
        &self.paths[i]
    }

    pub fn describe_location(&self) -> PathBuf {
        match self.paths.as_slice() {
            [one] => one.clone(),
            _ => self.paths[0].parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }

    /// The raw little-endian bytes of a tensor, straight from the map.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor { path: self.describe_location(), name: name.into() })?;
        Ok(&self.maps[e.file][e.start..e.end])
    }

    /// The entry of `name`, which must have `shape`.
    fn shaped(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor { path: self.describe_location(), name: name.into() })?;
        if e.shape != shape {
            return Err(Error::TensorShape { path: self.paths[e.file].clone(), name: name.into(), got: e.shape.clone(), expected: shape.to_vec() });
        }
        Ok(e)
    }

    /// Checks that `name` is present with `shape`, reading nothing.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.shaped(name, shape).map(|_| ())
    }

    /// Reads `name` in its stored dtype onto `device`, checking its shape.
    pub fn load(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let e = self.shaped(name, shape)?;
        let view = TensorView::new(to_st_dtype(e.dtype), e.shape.clone(), self.bytes(name)?)
            .map_err(|err| Error::bad_file(&self.paths[e.file], format!("tensor `{name}`: {err}")))?;
        Ok(view.load(device)?)
    }
}

/// Writes tensors to a safetensors file atomically: written in a staging folder beside it, then
/// renamed, so a failure (or a kill) never leaves a partial file under `path`.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let target = Target::check(path, "--out", OutKind::File, true, &[])?;
    write_safetensors_to(&target, tensors, metadata)
}

/// [`write_safetensors`] to an output already checked (against the run's inputs, say).
pub fn write_safetensors_to(target: &Target, tensors: &[(&str, &Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let mut owned = Vec::new();
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let bytes = tensor_bytes(&t)?;
        owned.push((name.to_string(), t.dtype(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| TensorView::new(to_st_dtype(*d), s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::internal)?;
    let staging = Staging::create(target)?;
    let tmp = staging.out();
    safetensors::serialize_to_file(views, metadata, &tmp).map_err(|e| staging.user_error(Error::bad_file(&tmp, e)))?;
    crate::staging::set_default_mode(&tmp).map_err(|e| staging.user_error(e))?;
    staging.commit()
}

/// The little-endian bytes of a contiguous CPU tensor.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    fn le<T: Copy>(v: &[T], f: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => le(&flat.to_vec1::<f32>()?, |x| x.to_le_bytes().to_vec()),
        DType::BF16 => le(&flat.to_vec1::<half::bf16>()?, |x| x.to_le_bytes().to_vec()),
        DType::F16 => le(&flat.to_vec1::<half::f16>()?, |x| x.to_le_bytes().to_vec()),
        DType::I64 => le(&flat.to_vec1::<i64>()?, |x| x.to_le_bytes().to_vec()),
        DType::U32 => le(&flat.to_vec1::<u32>()?, |x| x.to_le_bytes().to_vec()),
        DType::F64 => le(&flat.to_vec1::<f64>()?, |x| x.to_le_bytes().to_vec()),
        DType::U8 => flat.to_vec1::<u8>()?,
        d => return Err(Error::internal(format!("cannot serialise dtype {d:?}"))),
    })
}

/// Copies `W`-byte little-endian floats out of `bytes` (`decode` makes the bits, `make` the value),
/// and says whether any has an all-ones exponent (±Inf or NaN). One pass does both, so the check
/// costs no second read of the weights.
fn copy_finite<const W: usize, B, T>(bytes: &[u8], decode: fn([u8; W]) -> B, exponent: B, make: fn(B) -> T) -> (Vec<T>, bool)
where
    B: Copy + std::ops::BitAnd<Output = B> + PartialEq,
{
    let (chunks, _) = bytes.as_chunks::<W>();
    let mut bad = false;
    let mut out = Vec::with_capacity(chunks.len());
    // Block by block: each block is copied, then checked while it is still in L1, so memory is read
    // once; both loops vectorise (a check inside the copy loop would stop that).
    for block in chunks.chunks(2048) {
        out.extend(block.iter().map(|c| make(decode(*c))));
        bad |= block.iter().fold(false, |acc, c| acc | ((decode(*c) & exponent) == exponent));
    }
    (out, !bad)
}

impl Checkpoint {
    /// Reads weight `name` onto `device`: float only (an integer or quantized tensor is refused, not
    /// cast), every value finite (a NaN or Inf weight makes every logit NaN), shape checked.
    pub fn load_weight(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let e = self.shaped(name, shape)?;
        let path = &self.paths[e.file];
        let bytes = &self.maps[e.file][e.start..e.end];
        let (t, finite) = match e.dtype {
            DType::BF16 => {
                let (v, ok) = copy_finite(bytes, u16::from_le_bytes, 0x7f80, half::bf16::from_bits);
                (Tensor::from_vec(v, shape, &Device::Cpu)?, ok)
            }
            DType::F16 => {
                let (v, ok) = copy_finite(bytes, u16::from_le_bytes, 0x7c00, half::f16::from_bits);
                (Tensor::from_vec(v, shape, &Device::Cpu)?, ok)
            }
            DType::F32 => {
                let (v, ok) = copy_finite(bytes, u32::from_le_bytes, 0x7f80_0000, f32::from_bits);
                (Tensor::from_vec(v, shape, &Device::Cpu)?, ok)
            }
            DType::F64 => {
                let (v, ok) = copy_finite(bytes, u64::from_le_bytes, 0x7ff0_0000_0000_0000, f64::from_bits);
                (Tensor::from_vec(v, shape, &Device::Cpu)?, ok)
            }
            d => {
                let msg = format!("tensor `{name}` is {}: weights must be bf16, f16 or f32", dtype_label(d));
                return Err(Error::bad_file(path, msg));
            }
        };
        if !finite {
            return Err(Error::bad_file(path, format!("tensor `{name}` holds NaN or infinite values")));
        }
        Ok(t.to_device(device)?)
    }
}

/// Whether every value of a little-endian float buffer is finite (no all-ones exponent).
pub fn all_finite(bytes: &[u8], dtype: DType) -> bool {
    fn check<const W: usize, B: Copy + std::ops::BitAnd<Output = B> + PartialEq>(bytes: &[u8], decode: fn([u8; W]) -> B, exponent: B) -> bool {
        bytes.as_chunks::<W>().0.iter().all(|c| decode(*c) & exponent != exponent)
    }
    match dtype {
        DType::BF16 => check(bytes, u16::from_le_bytes, 0x7f80),
        DType::F16 => check(bytes, u16::from_le_bytes, 0x7c00),
        DType::F32 => check(bytes, u32::from_le_bytes, 0x7f80_0000),
        DType::F64 => check(bytes, u64::from_le_bytes, 0x7ff0_0000_0000_0000),
        _ => true,
    }
}

/// Why a finite weight cannot be cast to `dtype`: its largest value in magnitude, `value` (times
/// `scale`, a mergekit scale), is out of `dtype`'s range, so the cast would make it infinite (a bf16
/// 99840 is +Inf in f16) and every logit NaN. `whose` names where `dtype` came from (or is empty),
/// `fix` says what to do instead.
pub fn out_of_range(name: &str, value: f64, scale: f64, dtype: DType, whose: &str, fix: &str) -> String {
    let shown = |x: f64| if x.abs() < 1e6 { format!("{x}") } else { format!("{x:e}") };
    let scaled = if scale == 1.0 { String::new() } else { format!(" (× scale {})", shown(scale)) };
    let (short, range) = match dtype {
        DType::F16 => ("f16", "±65504"),
        DType::BF16 => ("bf16", "±3.39e38"),
        _ => ("f32", "±3.40e38"),
    };
    format!("tensor `{name}` holds {}{scaled}, out of {short}'s range ({range}){whose}: it would become infinite, and every logit NaN; {fix}", shown(value))
}

/// A dtype as safetensors names it (`I64`, `U8`), for messages.
pub fn dtype_label(d: DType) -> String {
    format!("{:?}", to_st_dtype(d))
}

impl crate::model::WeightSource for Checkpoint {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.load_weight(name, shape, device)
    }

    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }

    fn location(&self, name: &str) -> Option<PathBuf> {
        Some(self.path_of(name).to_path_buf())
    }
}

impl Checkpoint {
    /// A private copy of tensor `name`'s raw bytes; the mapped pages it came from are handed back to
    /// the page cache at once, so streaming through a checkpoint never keeps more than the tensor at
    /// hand resident (file-backed pages would otherwise count towards the process's RSS).
    pub fn read_and_release(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor { path: self.describe_location(), name: name.into() })?;
        let map = &self.maps[e.file];
        // Copied in 16 MB pieces, each released right after: the mapped pages of a tensor and its
        // copy are never resident together, so the peak is one tensor, not two.
        const CHUNK: usize = 16 << 20;
        let mut bytes = Vec::with_capacity(e.end - e.start);
        let mut at = e.start;
        while at < e.end {
            let end = (at + CHUNK).min(e.end);
            bytes.extend_from_slice(&map[at..end]);
            #[cfg(unix)]
            {
                // SAFETY: the map is a read-only shared mapping of an unmodified file (memmap2's
                // `Mmap::map`: PROT_READ, MAP_SHARED), never written through, and `bytes` is an owned
                // copy. MADV_DONTNEED only drops this process's page-table entries; a later access
                // re-faults the same file contents, so no live reference observes a change.
                // Failure only means the pages stay resident, hence ignored.
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, end - at) };
            }
            at = end;
        }
        Ok(bytes)
    }
}

/// One tensor of a shard being streamed to disk: its bytes are produced only when the writer
/// reaches it, so a shard never holds more than one tensor in memory.
pub struct ShardTensor<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Produces exactly `numel × dtype size` little-endian bytes; called once.
    pub bytes: Box<dyn Fn() -> Result<Vec<u8>> + 'a>,
}

impl ShardTensor<'_> {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

struct LazyView<'t, 'a> {
    tensor: &'t ShardTensor<'a>,
    dtype: StDtype,
    on_written: &'t dyn Fn(u64),
    /// `View::data` cannot fail, so the first producer error is parked here and returned by
    /// `write_shard` once the (then discarded) file is closed.
    failed: &'t std::cell::RefCell<Option<Error>>,
}

impl safetensors::View for LazyView<'_, '_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let want = self.tensor.byte_len();
        let bytes = match (self.tensor.bytes)() {
            // A wrong length would shift every later tensor of the file: refuse it.
            Ok(b) if b.len() == want => b,
            Ok(b) => {
                let msg = format!("tensor `{}` produced {} bytes, expected {want}", self.tensor.name, b.len());
                self.failed.borrow_mut().get_or_insert(Error::bad_file(&self.tensor.name, msg));
                vec![0; want]
            }
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                vec![0; want]
            }
        };
        (self.on_written)(want as u64);
        std::borrow::Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.tensor.byte_len()
    }
}

/// Writes one safetensors shard tensor by tensor. The header is laid out by the safetensors crate
/// itself (the same code Python's `safetensors.torch.save_file` runs: tensors sorted by dtype
/// alignment then name, header space-padded to 8 bytes), so the file is byte-identical to one
/// written from PyTorch with the same `metadata`. `on_written` hears each tensor's byte count.
/// On error the file may exist partially: callers write into a staging folder.
pub fn write_shard(path: &Path, tensors: &[ShardTensor<'_>], metadata: HashMap<String, String>, on_written: &dyn Fn(u64)) -> Result<()> {
    let failed = std::cell::RefCell::new(None);
    let views: Vec<(&str, LazyView<'_, '_>)> =
        tensors.iter().map(|t| (t.name.as_str(), LazyView { tensor: t, dtype: to_st_dtype(t.dtype), on_written, failed: &failed })).collect();
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::bad_file(path, e))?;
    match failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
