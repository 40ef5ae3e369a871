//! `expanse bench`: prefill and decode throughput of the base, expanded and skip-transparent variants
//! of one loaded model, side by side in one run (llama-bench's pp/tg tests, without tokenization).

use std::collections::HashSet;
use std::fmt;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::engine::ids_tensor;
use crate::error::{Error, Result};
use crate::expand::Plan;
use crate::model::{Cache, Logits, Model};

/// A model variant the bench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The source layers only, each once (sharing the expanded model's tensors).
    Base,
    /// Every block of the expanded stack executed.
    Expanded,
    /// The expanded stack with load-time-verified transparent blocks skipped.
    Skip,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Base => "base",
            Variant::Expanded => "expanded",
            Variant::Skip => "skip",
        }
    }

    /// Parses `--variants base,expanded,skip`.
    pub fn parse_list(text: &str) -> Result<Vec<Variant>> {
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let v = match part {
                "base" => Variant::Base,
                "expanded" => Variant::Expanded,
                "skip" => Variant::Skip,
                _ => return Err(Error::flag("--variants", format!("`{part}`: expected base, expanded or skip"))),
            };
            if !out.contains(&v) {
                out.push(v);
            }
        }
        if out.is_empty() {
            return Err(Error::flag("--variants", "no variant given"));
        }
        Ok(out)
    }
}

/// What to measure, as llama-bench's flags.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchOptions {
    /// Prompt length of the prefill test (0: no prefill test).
    pub prefill: usize,
    /// Tokens of the decode test (0: no decode test).
    pub decode: usize,
    /// Context already in the cache before each test (not timed).
    pub depth: usize,
    pub repetitions: usize,
    pub warmup: usize,
    pub variants: Vec<Variant>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prefill: 512,
            decode: 128,
            depth: 0,
            repetitions: 5,
            warmup: 1,
            variants: vec![Variant::Base, Variant::Expanded, Variant::Skip],
        }
    }
}

/// One test of one variant: throughput over the repetitions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub variant: Variant,
    /// Blocks in the variant's stack.
    pub layers: usize,
    /// Blocks actually executed per token.
    pub executed_layers: usize,
    /// Parameters the variant executes (a copied layer counts again; tied embeddings once).
    pub params: usize,
    /// `pp512`, `tg128`, `tg128@d512`.
    pub test: String,
    pub tokens: usize,
    /// Tokens per second of each repetition.
    pub samples: Vec<f64>,
    pub mean_tps: f64,
    pub sd_tps: f64,
    pub median_tps: f64,
    /// mean / the base variant's mean on the same test (None without a base row).
    pub ratio_to_base: Option<f64>,
}

/// Memory after one variant's tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryRow {
    pub variant: Variant,
    /// Bytes of distinct weight storage the variant reads (shared copies count once).
    pub weight_bytes: usize,
    /// Process peak resident set (VmHWM) after the variant ran; all variants share one process, so
    /// this is cumulative: the weights are loaded once, before the first variant.
    pub host_peak_bytes: Option<u64>,
    /// Process resident set (VmRSS) after the variant ran.
    pub host_rss_bytes: Option<u64>,
    /// GPU memory in use after the variant ran, device-wide (total − free; CUDA only).
    pub gpu_bytes: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub plan: String,
    pub dtype: String,
    pub device: String,
    pub threads: usize,
    pub options: BenchOptions,
    pub rows: Vec<BenchRow>,
    pub memory: Vec<MemoryRow>,
}

/// A variant ready to run.
struct Prepared {
    variant: Variant,
    model: Model,
}

/// Builds the requested variants from the expanded `model`. The base variant is
/// `model.with_blocks(non-inserted layers)`: the same tensors, so base vs expanded differ only by the
/// inserted blocks (and stay bit-identical in output).
fn prepare(model: &Model, plan: &Plan, variants: &[Variant]) -> Result<Vec<Prepared>> {
    let inserted: HashSet<usize> = plan.inserted().into_iter().collect();
    let keep: Vec<usize> = (0..model.blocks.len()).filter(|i| !inserted.contains(i)).collect();
    variants
        .iter()
        .map(|&variant| {
            let model = match variant {
                Variant::Base => model.with_blocks(&keep),
                Variant::Expanded => model.clone(),
                Variant::Skip => {
                    let mut m = model.clone();
                    m.skip_transparent()?;
                    m
                }
            };
            Ok(Prepared { variant, model })
        })
        .collect()
}

/// Distinct weight bytes and executed parameter count of `model` as it runs.
pub fn executed_weights(model: &Model) -> (usize, usize) {
    let mut params = model.embed_tokens.elem_count() + model.norm.elem_count();
    if model.lm_head.weight.id() != model.embed_tokens.id() {
        params += model.lm_head.weight.elem_count();
    }
    let mut run: Vec<&Tensor> = vec![&model.embed_tokens, &model.norm, &model.lm_head.weight];
    for b in model.blocks.iter().filter(|b| model.runs(b)) {
        params += b.tensors().iter().map(|t| t.elem_count()).sum::<usize>();
        run.extend(b.tensors());
    }
    (crate::model::storage_bytes(run), params)
}

/// Deterministic pseudo-random token ids (not a real prompt: speed does not depend on the values).
fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn sync(device: &Device) -> Result<()> {
    crate::device::synchronize(device)
}

/// Fills `cache` with `depth` tokens (untimed).
fn fill(model: &Model, cache: &mut Cache, depth: usize) -> Result<()> {
    if depth > 0 {
        let ids = tokens(depth, model.config.vocab_size, 7);
        model.forward(&ids_tensor(&ids, &model.device)?, cache, Logits::Last)?;
    }
    Ok(())
}

/// One prefill of `n` tokens after `depth`; returns seconds.
fn run_prefill(model: &Model, n: usize, depth: usize) -> Result<f64> {
    let mut cache = Cache::new(model, depth + n)?;
    fill(model, &mut cache, depth)?;
    let ids = ids_tensor(&tokens(n, model.config.vocab_size, 1), &model.device)?;
    sync(&model.device)?;
    let t = Instant::now();
    let logits = model.forward(&ids, &mut cache, Logits::Last)?;
    drop(logits);
    sync(&model.device)?;
    Ok(t.elapsed().as_secs_f64())
}

/// `n` single-token decode steps after `depth`; returns seconds. Like llama-bench's tg test, the next
/// token is fixed rather than sampled, so only the model is timed.
fn run_decode(model: &Model, n: usize, depth: usize) -> Result<f64> {
    let mut cache = Cache::new(model, depth + n)?;
    fill(model, &mut cache, depth)?;
    let ids = tokens(n, model.config.vocab_size, 2);
    let ids: Vec<Tensor> = ids.iter().map(|&i| ids_tensor(&[i], &model.device)).collect::<Result<_>>()?;
    sync(&model.device)?;
    let t = Instant::now();
    for id in &ids {
        let logits = model.forward(id, &mut cache, Logits::Last)?;
        drop(logits);
    }
    sync(&model.device)?;
    Ok(t.elapsed().as_secs_f64())
}

fn stats(samples: &[f64]) -> (f64, f64, f64) {
    let n = samples.len().max(1) as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 {
        samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (samples.len() - 1) as f64
    } else {
        0.0
    };
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = match sorted.len() {
        0 => 0.0,
        l if l % 2 == 1 => sorted[l / 2],
        l => (sorted[l / 2 - 1] + sorted[l / 2]) / 2.0,
    };
    (mean, var.sqrt(), median)
}

/// Context information printed with the report.
pub struct BenchTarget<'a> {
    pub name: String,
    pub plan: &'a Plan,
    pub model: &'a Model,
}

/// Runs every test of every variant. `progress` is told each finished repetition (and the total).
pub fn run(target: &BenchTarget, opts: &BenchOptions, mut progress: impl FnMut(&str, u64, u64)) -> Result<BenchReport> {
    let model = target.model;
    let max = model.config.max_position_embeddings;
    for (flag, need) in [("-p", opts.depth + opts.prefill), ("-n", opts.depth + opts.decode)] {
        if need > max {
            return Err(Error::flag(flag, format!("depth + tokens = {need} exceeds max_position_embeddings {max}")));
        }
    }
    if opts.repetitions == 0 {
        return Err(Error::flag("-r", "at least one repetition"));
    }
    if model.skips_transparent() && opts.variants.contains(&Variant::Expanded) {
        return Err(Error::flag(
            "--skip-transparent",
            "the model was loaded without its zero projections, so the expanded variant cannot run; use --variants base,skip or drop the flag",
        ));
    }
    let mut tests: Vec<(String, bool, usize)> = Vec::new();
    let at = |t: String| if opts.depth > 0 { format!("{t}@d{}", opts.depth) } else { t };
    if opts.prefill > 0 {
        tests.push((at(format!("pp{}", opts.prefill)), true, opts.prefill));
    }
    if opts.decode > 0 {
        tests.push((at(format!("tg{}", opts.decode)), false, opts.decode));
    }
    if tests.is_empty() {
        return Err(Error::flag("-p/-n", "nothing to run: both are 0"));
    }
    let prepared = prepare(model, target.plan, &opts.variants)?;
    let total = (prepared.len() * tests.len() * (opts.warmup + opts.repetitions)) as u64;
    let mut done = 0u64;
    let mut rows = Vec::new();
    let mut memory = Vec::new();
    for p in &prepared {
        let (weight_bytes, params) = executed_weights(&p.model);
        let executed = p.model.blocks.iter().filter(|b| p.model.runs(b)).count();
        for (test, is_prefill, n) in &tests {
            let label = format!("{} {test}", p.variant.name());
            let mut samples = Vec::with_capacity(opts.repetitions);
            for rep in 0..opts.warmup + opts.repetitions {
                let secs = if *is_prefill {
                    run_prefill(&p.model, *n, opts.depth)?
                } else {
                    run_decode(&p.model, *n, opts.depth)?
                };
                if rep >= opts.warmup {
                    samples.push(*n as f64 / secs.max(1e-12));
                }
                done += 1;
                progress(&label, done, total);
            }
            let (mean, sd, median) = stats(&samples);
            rows.push(BenchRow {
                variant: p.variant,
                layers: p.model.blocks.len(),
                executed_layers: executed,
                params,
                test: test.clone(),
                tokens: *n,
                samples,
                mean_tps: mean,
                sd_tps: sd,
                median_tps: median,
                ratio_to_base: None,
            });
        }
        let status = HostMemory::read();
        memory.push(MemoryRow {
            variant: p.variant,
            weight_bytes,
            host_peak_bytes: status.peak,
            host_rss_bytes: status.rss,
            gpu_bytes: crate::device::gpu_memory_used(&model.device),
        });
    }
    let base: Vec<(String, f64)> =
        rows.iter().filter(|r| r.variant == Variant::Base).map(|r| (r.test.clone(), r.mean_tps)).collect();
    for r in rows.iter_mut() {
        r.ratio_to_base = base.iter().find(|(t, _)| *t == r.test).map(|(_, b)| r.mean_tps / b.max(1e-12));
    }
    Ok(BenchReport {
        model: target.name.clone(),
        plan: target.plan.spec.clone(),
        dtype: crate::config::dtype_hf_name(model.dtype).to_string(),
        device: crate::device::name(&model.device),
        threads: candle_core::utils::get_num_threads(),
        options: opts.clone(),
        rows,
        memory,
    })
}

/// Resident set of this process from /proc/self/status (Linux; None elsewhere).
struct HostMemory {
    peak: Option<u64>,
    rss: Option<u64>,
}

impl HostMemory {
    fn read() -> HostMemory {
        let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(key))?;
            let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        };
        HostMemory { peak: field("VmHWM:"), rss: field("VmRSS:") }
    }
}

fn opt_bytes(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| crate::expand::human_bytes(b as usize))
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| model | plan | variant | layers | params | dtype | device | test | t/s | ratio |")?;
        writeln!(f, "|---|---|---|---:|---:|---|---|---|---:|---:|")?;
        for r in &self.rows {
            let layers = if r.executed_layers == r.layers {
                r.layers.to_string()
            } else {
                format!("{} ({} run)", r.layers, r.executed_layers)
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} |",
                self.model,
                self.plan,
                r.variant.name(),
                layers,
                crate::expand::human_params(r.params),
                self.dtype,
                self.device,
                r.test,
                r.mean_tps,
                r.sd_tps,
                r.ratio_to_base.map_or("-".into(), |x| format!("{x:.3}")),
            )?;
        }
        writeln!(f)?;
        writeln!(f, "| variant | weights read | host peak (VmHWM) | host RSS | GPU in use |")?;
        writeln!(f, "|---|---:|---:|---:|---:|")?;
        for m in &self.memory {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} |",
                m.variant.name(),
                crate::expand::human_bytes(m.weight_bytes),
                opt_bytes(m.host_peak_bytes),
                opt_bytes(m.host_rss_bytes),
                opt_bytes(m.gpu_bytes)
            )?;
        }
        write!(
            f,
            "\n{} warmup + {} repetitions per test; host memory is per process (all variants share one load)",
            self.options.warmup, self.options.repetitions
        )
    }
}
