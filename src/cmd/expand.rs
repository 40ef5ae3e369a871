//! `expanse expand`: writes the expanded checkpoint to disk (`--out`), streamed tensor by tensor, in
//! the layout mergekit 0.1.5 writes, so vLLM, TGI, transformers and fine-tuning scripts take it as-is.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use clap::Args;
use half::{bf16, f16};

use crate::config::{dtype_hf_name, parse_dtype};
use crate::engine::{Source, Weights};
use crate::error::{Error, Result};
use crate::expand::{human_bytes, layer_tensor_name, layer_tensor_shape, scale_for, Plan, ScaleRule, LAYER_TENSORS};
use crate::loader::{all_finite, write_shard, Checkpoint, ShardTensor};
use crate::staging::{set_default_mode, OutKind, Staging, Target};

use super::args::SourceArgs;
use super::{print_report, Failure};

#[derive(Args)]
pub struct ExpandArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Output folder, or a FILE.gguf for a GGUF --model (written beside it first, then renamed into place)
    #[arg(long)]
    out: PathBuf,
    /// auto (the YAML's dtype, else the checkpoint's), bf16, f16 or f32
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Largest shard, in tensor bytes (mergekit's rule): 5B, 5GB, 500MB or a byte count [default: 5B]
    #[arg(long)]
    shard_size: Option<String>,
    /// Replace a non-empty --out folder, or an existing --out file
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

/// `expanse expand`
pub fn run(args: ExpandArgs) -> Result<(), Failure> {
    let ExpandArgs { source, out, dtype, shard_size, force, json } = args;
    let gguf = crate::quant::gguf::is_gguf_path(&out);
    if gguf && shard_size.is_some() {
        return Err(Error::flag("--shard-size", "a GGUF is written as one file; leave --shard-size out").into());
    }
    let opts = ExportOptions {
        model: source.checkpoint.model,
        revision: source.checkpoint.revision,
        expand: source.expand,
        dtype,
        out,
        shard_size: shard_size.as_deref().map_or(Ok(DEFAULT_SHARD_SIZE), parse_shard_size)?,
        force,
        progress: true,
    };
    crate::staging::install_interrupt_cleanup();
    let report = if gguf { super::expand_gguf::export_gguf(&opts)? } else { export(&opts)? };
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    print_report(&report, json)?;
    Ok(())
}

/// mergekit's `--out-shard-size` default (`5B`): compared with the sum of tensor bytes, not file sizes.
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Test-only: pretend the output's file system has this many free bytes (exercises the space check).
pub const FAKE_FREE_BYTES_ENV: &str = "EXPANSE_FAKE_FREE_BYTES";

/// Tokenizer files copied beside the weights when the source has them (mergekit's `--copy-tokenizer`).
const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub model: String,
    pub revision: Option<String>,
    /// `none`, `every:N` or a mergekit YAML path.
    pub expand: String,
    /// `auto` (the YAML's dtype, else the checkpoint's), `bf16`, `f16` or `f32`.
    pub dtype: String,
    pub out: PathBuf,
    /// Largest sum of tensor bytes per shard.
    pub shard_size: u64,
    /// Replace a non-empty `out`.
    pub force: bool,
    /// Draw a byte progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl ExportOptions {
    pub fn new(model: impl Into<String>, expand: impl Into<String>, out: impl Into<PathBuf>) -> Self {
        ExportOptions {
            model: model.into(),
            revision: None,
            expand: expand.into(),
            dtype: "auto".into(),
            out: out.into(),
            shard_size: DEFAULT_SHARD_SIZE,
            force: false,
            progress: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShardReport {
    pub file: String,
    pub tensors: usize,
    /// Sum of the shard's tensor bytes (the quantity `--shard-size` bounds).
    pub tensor_bytes: u64,
}

/// What `expand --out` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    pub model: String,
    pub expand: String,
    pub source_layers: usize,
    pub layers: usize,
    pub inserted: Vec<usize>,
    pub dtype: String,
    pub tensors: usize,
    pub tensor_bytes: u64,
    pub shards: Vec<ShardReport>,
    /// Every file in `out`, sorted.
    pub files: Vec<String>,
    pub seconds: f64,
    /// The process's peak resident set (VmHWM), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    pub warnings: Vec<String>,
}

impl fmt::Display for ExportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "wrote {}: {} ({} → {} layers, {}), {}", self.out.display(), self.model, self.source_layers, self.layers, self.expand, self.dtype)?;
        let inserted: Vec<String> = self.inserted.iter().map(usize::to_string).collect();
        writeln!(f, "  inserted layers: {}", if inserted.is_empty() { "none".into() } else { inserted.join(", ") })?;
        for s in &self.shards {
            writeln!(f, "  {} · {} tensors · {}", s.file, s.tensors, human_bytes(s.tensor_bytes as usize))?;
        }
        write!(f, "  {} tensors, {} in {:.2} s", self.tensors, human_bytes(self.tensor_bytes as usize), self.seconds)?;
        if let Some(rss) = self.peak_rss_bytes {
            write!(f, " · peak RSS {}", human_bytes(rss as usize))?;
        }
        Ok(())
    }
}

/// Parses `--shard-size`: bytes, optionally with a decimal suffix K/M/G (or mergekit's `B`, billions).
pub fn parse_shard_size(text: &str) -> Result<u64> {
    let bad = || Error::flag("--shard-size", format!("`{text}`: expected a positive size such as 5B, 5GB, 500MB or 1000000"));
    let t = text.trim().to_ascii_uppercase();
    // Two-letter suffixes first: `500MB` must not be read as `500M` billions.
    const SUFFIXES: [(&str, f64); 7] = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("G", 1e9), ("B", 1e9), ("M", 1e6), ("K", 1e3)];
    let (num, mult) = SUFFIXES.iter().find_map(|(s, m)| t.strip_suffix(s).map(|n| (n, *m))).unwrap_or((t.as_str(), 1.0));
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = (v * mult).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// One output tensor: where its bytes come from and how they are transformed.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    source: String,
    shape: Vec<usize>,
    from: DType,
    scale: f64,
}

/// The output tensors in the order mergekit 0.1.5 saves them, which decides shard boundaries and
/// the index's order. Its executor runs tasks in a lexicographical topological sort keyed by group
/// label, and a save task's label is its *source* tensor's name: so tensors come sorted by source
/// name as a string (`lm_head` first, `model.layers.10.` before `model.layers.2.`, `model.norm`
/// last), and the copies of one source tensor together, in output order (checked against
/// `mergekit-yaml --out-shard-size 1M` on the every-4 fixture).
fn plan_tensors(source: &Source, plan: &Plan) -> Result<Vec<Planned>> {
    let cfg = &source.config;
    let ck = source.safetensors("expand --out")?;
    let mut out = Vec::new();
    let mut add = |name: String, src: String, shape: Vec<usize>, scale: f64| -> Result<()> {
        let e = ck.entry(&src).ok_or_else(|| Error::MissingTensor { path: ck.describe_location(), name: src.clone() })?;
        if e.shape != shape {
            return Err(Error::TensorShape { path: ck.path_of(&src).into(), name: src, got: e.shape.clone(), expected: shape });
        }
        if !matches!(e.dtype, DType::BF16 | DType::F16 | DType::F32) {
            return Err(Error::bad_file(ck.path_of(&src), format!("tensor `{src}` is {:?}; expanse writes bf16, f16 or f32", e.dtype)));
        }
        out.push(Planned { name, source: src, shape, from: e.dtype, scale });
        Ok(())
    };
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed = "model.embed_tokens.weight";
    add(embed.into(), embed.into(), vec![v, h], scale_for(&plan.embed_scale, embed))?;
    for (i, lp) in plan.layers.iter().enumerate() {
        for suffix in LAYER_TENSORS {
            add(layer_tensor_name(i, suffix), layer_tensor_name(lp.source, suffix), layer_tensor_shape(cfg, suffix), plan.layer_scale(i, suffix))?;
        }
    }
    let norm = "model.norm.weight";
    add(norm.into(), norm.into(), vec![h], scale_for(&plan.head_scale, norm))?;
    // mergekit's lm_head is optional (tied to the embedding); it is written whenever the source has one.
    let head = "lm_head.weight";
    if ck.contains(head) || !cfg.tie_word_embeddings {
        add(head.into(), head.into(), vec![v, h], scale_for(&plan.head_scale, head))?;
    }
    // Stable: copies of one source keep their output order.
    out.sort_by(|a, b| a.source.cmp(&b.source));
    Ok(out)
}

/// mergekit's `TensorWriter.save_tensor` rule: start a new shard when the next tensor would push a
/// non-empty shard past `max` bytes (a tensor larger than `max` gets a shard of its own).
fn split_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if !current.is_empty() && bytes + s > max {
            shards.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += s;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

fn shard_file(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

fn decode(c: &[u8], from: DType) -> f32 {
    match from {
        DType::BF16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
        DType::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
        _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
    }
}

fn encode(x: f32, to: DType, out: &mut [u8]) {
    match to {
        DType::BF16 => out.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
        _ => out.copy_from_slice(&x.to_le_bytes()),
    }
}

/// Rounds an f32 to the nearest value of `dtype` (ties to even, as PyTorch's casts do).
fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// mergekit's arithmetic on one tensor: cast to the merge dtype `via`, multiply by the scale in f32
/// and round once to `via` (so 0.0 × a negative weight stays −0.0), then cast to the output dtype.
/// A scale of exactly 1.0 is a no-op there too (x × 1.0 = x), so unscaled tensors are copied.
pub(super) fn transform(raw: Vec<u8>, from: DType, via: DType, scale: f64, to: DType) -> Vec<u8> {
    if from == via && via == to && scale == 1.0 {
        return raw;
    }
    let s = scale as f32;
    let f = |x: f32| {
        let x = round_to(x, via);
        if scale == 1.0 {
            x
        } else {
            round_to(x * s, via)
        }
    };
    let (fw, tw) = (from.size_in_bytes(), to.size_in_bytes());
    if fw == tw {
        // Same width: rewrite in place, so a scaled tensor costs no second buffer.
        let mut raw = raw;
        for c in raw.chunks_exact_mut(fw) {
            let y = f(decode(c, from));
            encode(y, to, c);
        }
        return raw;
    }
    let mut out = vec![0u8; raw.len() / fw * tw];
    for (c, o) in raw.chunks_exact(fw).zip(out.chunks_exact_mut(tw)) {
        encode(f(decode(c, from)), to, o);
    }
    out
}

/// The dtype written: `--dtype`, else the YAML's, else the checkpoint's.
fn output_dtype(flag: &str, plan: &Plan, stored: Option<DType>) -> Result<DType> {
    if flag == "auto" {
        return plan.dtype.or(stored).ok_or_else(|| Error::flag("--dtype", "the checkpoint does not say its dtype; pass --dtype bf16, f16 or f32"));
    }
    parse_dtype(flag).ok_or_else(|| Error::flag("--dtype", format!("`{flag}`: expected auto, bf16, f16 or f32")))
}

/// Replaces the value of the single `"key":` in a JSON text, keeping every other byte: transformers
/// re-saves a config with exactly the donor's layout (sorted keys, Python float spellings like
/// `1e-05`), which a re-serialisation here would not reproduce. `None` when the edit is not safe.
fn replace_json_value(text: &str, key: &str, value: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let mut hits = text.match_indices(&pat);
    let (at, _) = hits.next()?;
    // A second occurrence could be a nested config's key (or a string value): do not guess.
    if hits.next().is_some() {
        return None;
    }
    let after_key = at + pat.len();
    let rest = &text[after_key..];
    let colon = rest.find(|c: char| !c.is_whitespace())?;
    if !rest[colon..].starts_with(':') {
        return None;
    }
    let after_colon = after_key + colon + 1;
    let start = after_colon + text[after_colon..].find(|c: char| !c.is_whitespace())?;
    let end = if text[start..].starts_with('"') {
        let close = text[start + 1..].find('"')?;
        if text[start + 1..start + 1 + close].contains('\\') {
            return None;
        }
        start + 1 + close + 1
    } else {
        start + text[start..].find(|c: char| c == ',' || c == '}' || c.is_whitespace())?
    };
    Some(format!("{}{value}{}", &text[..start], &text[end..]))
}

/// The donor's config.json with `num_hidden_layers` and the dtype set, as mergekit writes it.
fn output_config(path: &Path, layers: usize, dtype: DType) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
    let obj = v.as_object_mut().ok_or_else(|| Error::bad_file(path, "expected a JSON object"))?;
    // transformers 5 writes `dtype`, 4.x `torch_dtype`: keep whichever the donor uses.
    let dtype_key = if obj.contains_key("torch_dtype") && !obj.contains_key("dtype") { "torch_dtype" } else { "dtype" };
    let name = dtype_hf_name(dtype);
    if obj.contains_key(dtype_key) {
        let edited =
            replace_json_value(&text, "num_hidden_layers", &layers.to_string()).and_then(|t| replace_json_value(&t, dtype_key, &format!("\"{name}\"")));
        if let Some(t) = edited {
            return Ok(t);
        }
    }
    obj.insert("num_hidden_layers".into(), layers.into());
    obj.insert(dtype_key.into(), name.into());
    let mut out = serde_json::to_string_pretty(&v).map_err(|e| Error::bad_file(path, e))?;
    out.push('\n');
    Ok(out)
}

fn yaml_scalar(s: &str) -> String {
    serde_yaml::to_string(s).map(|y| y.trim_end().to_string()).unwrap_or_else(|_| format!("{s:?}"))
}

/// The mergekit passthrough YAML equivalent to a plan given as `none`/`every:N`: consecutive layers
/// with the same rules form one slice; a layer's rules go on its source, as in
/// tests/fixtures/mergekit-every4.yml. Feeding it to mergekit (or expanse) gives the same checkpoint.
pub fn plan_yaml(plan: &Plan, model: &str, dtype: DType) -> String {
    let mut y = format!("# Written by expanse for `--expand {}`: the equivalent mergekit passthrough config.\nslices:\n", plan.spec);
    let mut i = 0;
    while i < plan.layers.len() {
        let first = &plan.layers[i];
        let mut j = i + 1;
        while j < plan.layers.len() && plan.layers[j].source == plan.layers[j - 1].source + 1 && plan.layers[j].scale == first.scale {
            j += 1;
        }
        let end = first.source + (j - i);
        y += &format!("  - sources:\n    - model: {}\n      layer_range: [{}, {end}]\n", yaml_scalar(model), first.source);
        if !first.scale.is_empty() {
            y += "      parameters:\n        scale:\n";
            for ScaleRule { filter, value } in &first.scale {
                match filter {
                    Some(f) => y += &format!("          - filter: {}\n            value: {value:?}\n", yaml_scalar(f)),
                    None => y += &format!("          - value: {value:?}\n"),
                }
            }
        }
        i = j;
    }
    y += &format!("merge_method: passthrough\ndtype: {}\n", dtype_hf_name(dtype));
    y
}

fn looks_like_hub_id(model: &str) -> bool {
    !Path::new(model).exists() && model.split('/').count() == 2 && !model.starts_with('.')
}

/// A model card in mergekit's layout, saying what expanse did.
fn readme(name: &str, model: &str, plan: &Plan, dtype: DType, yaml: &str) -> String {
    let (bases, model_md) = if looks_like_hub_id(model) {
        (format!("\n- {model}"), format!("[{model}](https://huggingface.co/{model})"))
    } else {
        (" []".to_string(), model.to_string())
    };
    let inserted: Vec<String> = plan.inserted().iter().map(usize::to_string).collect();
    format!(
        "---\nbase_model:{bases}\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n- expanse\n\n---\n# {name}\n\n\
         This is a LLaMA-Pro block expansion of {model_md}, written by expanse in the format of \
         [mergekit](https://github.com/cg123/mergekit) 0.1.5: {} → {} layers (`--expand {}`), inserted layers: {}, {}.\n\n\
         ## Merge Details\n### Merge Method\n\nThis model was merged using the Passthrough merge method.\n\n\
         ### Models Merged\n\nThe following models were included in the merge:\n* {model_md}\n\n\
         ### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n```yaml\n{yaml}\n```\n",
        plan.source_layers,
        plan.layers.len(),
        plan.spec,
        if inserted.is_empty() { "none".into() } else { inserted.join(", ") },
        dtype_hf_name(dtype),
    )
}

/// The index mergekit writes for several shards (`json.dump(indent=2)`, weight_map in save order,
/// no trailing newline). `mergekit_version` names the layout this file follows.
fn index_json(total: u64, weight_map: &[(String, String)]) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let entries: Vec<String> = weight_map.iter().map(|(n, f)| format!("    {}: {}", q(n), q(f))).collect();
    format!(
        "{{\n  \"metadata\": {{\n    \"total_size\": {total},\n    \"mergekit_version\": \"0.1.5\"\n  }},\n  \"weight_map\": {{\n{}\n  }}\n}}",
        entries.join(",\n")
    )
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    if let Ok(v) = std::env::var(FAKE_FREE_BYTES_ENV) {
        return v.trim().parse().map_err(|_| Error::flag(FAKE_FREE_BYTES_ENV, format!("`{v}` is not a byte count")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::bad_file(dir, "path contains a NUL byte"))?;
        // SAFETY: `c` is a NUL-terminated path and `st` a zeroed, writable statvfs the call fills.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(Error::io(dir, std::io::Error::last_os_error()));
        }
        #[allow(clippy::unnecessary_cast)] // the field widths differ between platforms
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(u64::MAX)
    }
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Copies `src` to `dst`, naming the side that failed: a full disk is the destination's fault, not
/// the source's. The copy gets the mode of a new file (the umask's), not the source's.
fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    std::fs::write(dst, bytes).map_err(|e| Error::io(dst, e))
}

/// Writes the expansion of `opts.model` by `opts.expand` to `opts.out`. Nothing appears at
/// `opts.out` unless every file was written.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    let started = Instant::now();
    if opts.shard_size == 0 {
        return Err(Error::flag("--shard-size", "must be at least 1 byte"));
    }
    // Cheap checks on the destination come before opening (maybe downloading) the model.
    Target::check(&opts.out, "--out", OutKind::Folder, opts.force, &[])?;
    let source = Source::open(&opts.model, opts.revision.as_deref())?;
    if let Weights::Gguf(g) = &source.weights {
        return Err(Error::bad_file(g.path(), "a GGUF file is expanded to a GGUF: give --out a FILE.gguf path"));
    }
    let plan = Plan::from_spec(&opts.expand, source.config.num_hidden_layers, &opts.model)?;
    let target = Target::check(&opts.out, "--out", OutKind::Folder, opts.force, &source.input_paths(&opts.expand))?;
    let dtype = output_dtype(&opts.dtype, &plan, source.stored_dtype())?;
    let tensors = plan_tensors(&source, &plan)?;
    let sizes: Vec<u64> = tensors.iter().map(|t| (t.shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64).collect();
    let shards = split_shards(&sizes, opts.shard_size);
    let tensor_bytes: u64 = sizes.iter().sum();

    let yaml = if opts.expand != "none" && !opts.expand.starts_with("every:") {
        std::fs::read_to_string(&opts.expand).map_err(|e| Error::io(&opts.expand, e))?
    } else {
        plan_yaml(&plan, &opts.model, dtype)
    };
    let mut texts = vec![
        ("config.json", output_config(&source.files.config, plan.layers.len(), dtype)?),
        ("README.md", readme(target.name(), &opts.model, &plan, dtype, &yaml)),
        ("mergekit_config.yml", yaml),
    ];
    let copies = side_copies(&source);
    check_space(target.parent(), tensor_bytes, &copies, tensors.len())?;

    let staging = Staging::create(&target)?;
    let dir = staging.out();
    let out = Shards { dir: &dir, ck: source.safetensors("expand --out")?, via: plan.dtype, dtype, progress: opts.progress };
    let written = out.write(&tensors, &sizes, &shards).and_then(|(reports, weight_map)| {
        if shards.len() > 1 {
            texts.push(("model.safetensors.index.json", index_json(tensor_bytes, &weight_map)));
        }
        write_side_files(&dir, &texts, &copies)?;
        Ok((reports, list_files(&dir)?))
    });
    let (shard_reports, files) = written.map_err(|e| staging.user_error(e))?;
    staging.commit()?;

    Ok(ExportReport {
        out: opts.out.clone(),
        model: opts.model.clone(),
        expand: plan.spec.clone(),
        source_layers: plan.source_layers,
        layers: plan.layers.len(),
        inserted: plan.inserted(),
        dtype: dtype_hf_name(dtype).into(),
        tensors: tensors.len(),
        tensor_bytes,
        shards: shard_reports,
        files,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        warnings: plan.warnings.clone(),
    })
}

/// Writes the output's text files and copies the source's side files into `dir`.
fn write_side_files(dir: &Path, texts: &[(&str, String)], copies: &[(PathBuf, &str)]) -> Result<()> {
    for (file, text) in texts {
        let p = dir.join(file);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }
    for (src, file) in copies {
        // Symlinks are followed, like mergekit's shutil.copy: the output stands on its own.
        copy_file(src, &dir.join(file))?;
    }
    Ok(())
}

/// Every file in `dir`, sorted.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<String> =
        std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(String::from))).collect();
    files.sort();
    Ok(files)
}

/// The source's tokenizer files and generation config that exist, with their names in the output.
fn side_copies(source: &Source) -> Vec<(PathBuf, &'static str)> {
    TOKENIZER_FILES
        .iter()
        .map(|f| (source.files.dir.join(f), *f))
        .chain(source.files.generation_config.clone().map(|p| (p, "generation_config.json")))
        .filter(|(p, _)| p.is_file())
        .collect()
}

/// Refuses to start an export that the destination's file system cannot hold.
pub(super) fn check_space(parent: &Path, tensor_bytes: u64, copies: &[(PathBuf, &str)], n_tensors: usize) -> Result<()> {
    let copy_bytes: u64 = copies.iter().filter_map(|(p, _)| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    // Headers are ~150 B per tensor; 1 MB covers them plus config, YAML, index and card.
    let needed = tensor_bytes + copy_bytes + (n_tensors as u64) * 256 + (1 << 20);
    let free = free_bytes(parent)?;
    if free < needed {
        return Err(Error::DiskSpace { path: parent.to_path_buf(), needed: human_bytes(needed as usize), free: human_bytes(free as usize) });
    }
    Ok(())
}

/// (tensor name, shard file) of every tensor written, for the shard index.
type WeightMap = Vec<(String, String)>;

/// Where and how the tensor shards are written.
struct Shards<'a> {
    dir: &'a Path,
    ck: &'a Checkpoint,
    /// The dtype a plan's `dtype` asks the scaling to happen in (None: each tensor's own).
    via: Option<DType>,
    dtype: DType,
    progress: bool,
}

impl<'a> Shards<'a> {
    /// Writes `shards` (indices into `tensors`), each tensor read from the checkpoint when its turn
    /// comes and released after; returns each shard's report and the index's weight map.
    fn write(&self, tensors: &[Planned], sizes: &[u64], shards: &[Vec<usize>]) -> Result<(Vec<ShardReport>, WeightMap)> {
        let bar = if self.progress { crate::progress::bytes_bar("writing", sizes.iter().sum()) } else { indicatif::ProgressBar::hidden() };
        let on_written = |n: u64| bar.inc(n);
        let mut reports = Vec::new();
        let mut weight_map = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = shard_file(i, shards.len());
            bar.set_message(file.clone());
            let items: Vec<ShardTensor<'_>> = shard.iter().map(|&k| self.item(&tensors[k])).collect();
            let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
            let path = self.dir.join(&file);
            write_shard(&path, &items, metadata, &on_written)?;
            set_default_mode(&path)?;
            weight_map.extend(shard.iter().map(|&k| (tensors[k].name.clone(), file.clone())));
            reports.push(ShardReport { file, tensors: shard.len(), tensor_bytes: shard.iter().map(|&k| sizes[k]).sum() });
        }
        bar.finish_and_clear();
        Ok((reports, weight_map))
    }

    /// One output tensor, its bytes produced when the shard writer asks for them.
    fn item<'t>(&self, t: &'t Planned) -> ShardTensor<'t>
    where
        'a: 't,
    {
        let (ck, via, dtype) = (self.ck, self.via.unwrap_or(t.from), self.dtype);
        ShardTensor {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
            bytes: Box::new(move || {
                let raw = ck.read_and_release(&t.source)?;
                // A NaN or Inf weight would make every logit of the written model NaN.
                if !all_finite(&raw, t.from) {
                    let msg = format!("tensor `{}` holds NaN or infinite values", t.source);
                    return Err(Error::bad_file(ck.path_of(&t.source), msg));
                }
                let out = transform(raw, t.from, via, t.scale, dtype);
                // A finite weight out of a narrower dtype's range (a bf16 99840 in f16) would be written infinite.
                if !all_finite(&out, dtype) {
                    return Err(overflow_error(ck, t, via, dtype));
                }
                Ok(out)
            }),
        }
    }
}

/// The error for tensor `t`, which its cast to `via` or to the output `dtype` made infinite (read
/// again for its largest value: this is the error path).
fn overflow_error(ck: &Checkpoint, t: &Planned, via: DType, dtype: DType) -> Error {
    let largest = |raw: Vec<u8>| raw.chunks_exact(t.from.size_in_bytes()).map(|c| decode(c, t.from)).fold(0f32, |m, x| if x.abs() > m.abs() { x } else { m });
    let value = ck.read_and_release(&t.source).map(largest).unwrap_or(f32::NAN);
    let in_via = !round_to(round_to(value, via) * t.scale as f32, via).is_finite();
    let (d, fix) =
        if in_via && via != dtype { (via, "set the YAML's dtype to bfloat16 or float32") } else { (dtype, "write it in bf16 or f32 (--dtype bf16)") };
    let msg = crate::loader::out_of_range(&t.source, value as f64, t.scale, d, "", fix);
    Error::bad_file(ck.path_of(&t.source), msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_split_follows_mergekit() {
        assert_eq!(split_shards(&[3, 3, 3], 6), vec![vec![0, 1], vec![2]]);
        // A tensor larger than the limit sits alone; an exact fit does not start a new shard.
        assert_eq!(split_shards(&[10, 2, 4], 6), vec![vec![0], vec![1, 2]]);
        assert_eq!(split_shards(&[1], 6), vec![vec![0]]);
    }

    #[test]
    fn shard_sizes_parse() {
        assert_eq!(parse_shard_size("5B").unwrap(), 5_000_000_000);
        assert_eq!(parse_shard_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_shard_size("1.5g").unwrap(), 1_500_000_000);
        assert_eq!(parse_shard_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_shard_size("3M").unwrap(), 3_000_000);
        assert_eq!(parse_shard_size("4096").unwrap(), 4096);
        for bad in ["", "0", "-1", "five", "5TB"] {
            assert!(parse_shard_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_scale_keeps_sign_and_casts_round_once() {
        let raw: Vec<u8> = [-1.5f32, 2.0, -0.0, 3.0].iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
        let out = transform(raw.clone(), DType::BF16, DType::BF16, 0.0, DType::BF16);
        let bits: Vec<u16> = out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(bits, vec![0x8000, 0x0000, 0x8000, 0x0000]);
        // Unscaled, same dtype: the very bytes.
        assert_eq!(transform(raw.clone(), DType::BF16, DType::BF16, 1.0, DType::BF16), raw);
        // f32 → bf16 merge dtype → f32 output: rounded through bf16 (1 + 2^-9 is not a bf16 value).
        let raw32: Vec<u8> = (1.0f32 + 2f32.powi(-9)).to_le_bytes().to_vec();
        assert_eq!(transform(raw32, DType::F32, DType::BF16, 1.0, DType::F32), 1.0f32.to_le_bytes().to_vec());
    }

    #[test]
    fn a_full_disk_is_blamed_on_the_destination() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-mistral-bf16/config.json");
        // Writing /dev/full fails with ENOSPC, as a full disk does.
        let err = copy_file(&src, Path::new("/dev/full")).unwrap_err().to_string();
        assert!(err.starts_with("/dev/full: ") && err.contains("No space left"), "{err}");
    }

    #[test]
    fn config_edit_keeps_layout() {
        let text = "{\n  \"dtype\": \"float32\",\n  \"num_hidden_layers\": 8,\n  \"rms_norm_eps\": 1e-05\n}\n";
        let t = replace_json_value(text, "num_hidden_layers", "10").unwrap();
        let t = replace_json_value(&t, "dtype", "\"bfloat16\"").unwrap();
        assert_eq!(t, "{\n  \"dtype\": \"bfloat16\",\n  \"num_hidden_layers\": 10,\n  \"rms_norm_eps\": 1e-05\n}\n");
        assert!(replace_json_value("{\"a\": {\"n\": 1}, \"n\": 2}", "n", "3").is_none());
    }
}
