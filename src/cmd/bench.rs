//! `expanse bench`: prefill and decode throughput of the base, expanded and skip-transparent variants
//! of one loaded model, on each decode path, side by side in one run (llama-bench's pp/tg tests,
//! without tokenization), with what each variant streams per token against the device's measured
//! copy bandwidth.

use std::collections::HashSet;
use std::fmt;
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Args;

use crate::engine::{self, ids_tensor};
use crate::error::{Error, Result};
use crate::expand::Plan;
use crate::model::{Cache, Logits, Model, WeightRef};
use crate::step::check;
use crate::step::plan::OpName;
use crate::step::roofline::{self, OpProfile};
use crate::step::{DecodePath, DecodeStep, StepOptions, StepOut};

use super::args::{DecodeArgs, ModelArgs, SkipArgs};
use super::{notices, print_report, select_device, Failure};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub(super) model: ModelArgs,
    #[command(flatten)]
    skip: SkipArgs,
    #[command(flatten)]
    decode_path: DecodeArgs,
    /// Random weights in a preset's shapes (openchat-3.5-0106) or a config.json's, instead of --model
    #[arg(long, value_name = "PRESET|CONFIG.json", conflicts_with_all = ["model", "revision"])]
    synthetic: Option<String>,
    /// Prompt tokens of the prefill test (0: skip it)
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    prefill: usize,
    /// Generated tokens of the decode test (0: skip it)
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    decode: usize,
    /// Tokens already in the KV cache before each test
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    depth: usize,
    /// Timed repetitions per test
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,
    /// Untimed runs before the repetitions
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Also decode N sequences together, as `serve --parallel` steps them: aggregate and
    /// per-sequence t/s (each sequence at --depth); a comma-separated list runs each
    #[arg(short = 'b', long = "batch", value_name = "N[,N…]")]
    batch: Option<String>,
    /// Variants to run: base, expanded, skip (comma-separated) [default: base,expanded,skip; with
    /// --skip-transparent: base,skip]
    #[arg(long)]
    variants: Option<String>,
    #[arg(long)]
    json: bool,
}

/// `expanse bench`
pub fn run(args: BenchArgs) -> Result<(), Failure> {
    // --threads was applied before the pool started (`cmd::run`).
    let opts = args.options()?;
    let (name, plan, model) = load_target(&args.model, &args.skip, args.synthetic.as_deref())?;
    let bar = crate::progress::bar(Some(0), "[{bar:30}] {pos}/{len} {msg} ({elapsed})");
    let target = BenchTarget { name, plan: &plan, model: &model };
    let report = measure(&target, &opts, |label, done, total| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(label.to_string());
    })?;
    bar.finish_and_clear();
    print_report(&report, args.json)?;
    Ok(())
}

impl BenchArgs {
    /// The tests the flags ask for, checked before the model loads.
    fn options(&self) -> Result<BenchOptions> {
        // --skip-transparent frees the zero projections the expanded variant would run.
        let variants = self.variants.clone().unwrap_or_else(|| if self.skip.skip_transparent { "base,skip" } else { "base,expanded,skip" }.to_string());
        if self.decode_path.inject_fault.is_some() {
            return Err(Error::flag("--inject-fault", "is for chat and generate (bench checks the fused path itself)"));
        }
        let paths = parse_paths(&self.decode_path.decode_path)?;
        let (prefill, decode, depth, repetitions, warmup) = (self.prefill, self.decode, self.depth, self.repetitions, self.warmup);
        let batch = self.batch.as_deref().map(parse_batches).transpose()?.unwrap_or_default();
        Ok(BenchOptions { prefill, decode, depth, repetitions, warmup, variants: Variant::parse_list(&variants)?, paths, batch })
    }
}

/// The model under test, its name and plan: random weights in a preset's shapes (`--synthetic`), or
/// the checkpoint.
fn load_target(model: &ModelArgs, skip: &SkipArgs, synthetic: Option<&str>) -> Result<(String, Plan, Model), Failure> {
    match synthetic {
        Some(spec) => {
            let device = select_device(&model.run.device)?;
            let opts = model.options(skip.skip_transparent);
            let (plan, m) = engine::load_synthetic(spec, &opts, &device)?;
            for n in engine::quant_notices(&m, &opts)? {
                eprintln!("{n}");
            }
            Ok((format!("synthetic:{spec}"), plan, m))
        }
        None => {
            let loaded = engine::load(&model.options(skip.skip_transparent))?;
            notices(&loaded);
            Ok((loaded.source.files.name.clone(), loaded.plan, loaded.model))
        }
    }
}

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
    /// Decode paths of the decode test (prefill always runs the reference path).
    pub paths: Vec<DecodePath>,
    /// Sequences of each batched decode test (`-b`; empty: no such test).
    pub batch: Vec<usize>,
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
            paths: vec![DecodePath::Auto],
            batch: Vec::new(),
        }
    }
}

/// Parses `-b 1,8,32`: the batch sizes of the batched decode tests, each at least 1.
fn parse_batches(text: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        match part.parse::<usize>() {
            Ok(n) if n >= 1 => out.push(n),
            _ => return Err(Error::flag("-b", format!("`{part}`: expected sequence counts of at least 1, like 1,8,32"))),
        }
    }
    Ok(out)
}

/// Parses `--decode-path auto,fused,…` for bench (a list: one decode row per path).
pub fn parse_paths(text: &str) -> Result<Vec<DecodePath>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p = DecodePath::parse(part)?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(Error::flag("--decode-path", "no path given"));
    }
    Ok(out)
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
    /// The path that ran (prefill: always `reference`; decode: `reference` after a failed self-check).
    pub path: DecodePath,
    /// Kernel launches per decoded token, counted by the fused step's dispatch (None off the step).
    pub launches_per_token: Option<usize>,
    /// Nodes of the captured CUDA graph (graph path only).
    pub graph_nodes: Option<usize>,
    /// Decode: tok/s × bytes streamed per token ÷ the device's measured copy bandwidth.
    pub bandwidth_fraction: Option<f64>,
    pub tokens: usize,
    /// Sequences decoded together (1 but in the batched test); t/s count every sequence's tokens.
    pub batch: usize,
    /// Tokens per second of each repetition.
    pub samples: Vec<f64>,
    pub mean_tps: f64,
    pub sd_tps: f64,
    pub median_tps: f64,
    /// mean / the base variant's mean on the same test (None without a base row).
    pub ratio_to_base: Option<f64>,
    /// The fused step's op kinds timed one kind at a time at the test's last position, beside the
    /// bytes each must move and their time at the copy bandwidth (None off the step).
    pub op_profile: Option<Vec<OpProfile>>,
}

/// Memory after one variant's tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryRow {
    pub variant: Variant,
    /// Bytes of distinct weight storage the variant holds (shared copies count once): its footprint.
    pub weights_held_bytes: usize,
    /// Bytes one decoded token streams: every executed block's weights (a copy's again: it shares
    /// storage, but no cache holds a layer), the final norm, the lm_head and one embedding row.
    pub streamed_per_token_bytes: usize,
    /// The KV cache of the decode test (depth + tokens), every executed block.
    pub kv_cache_bytes: usize,
    /// Process peak resident set (VmHWM) after the variant ran; all variants share one process, so
    /// this is cumulative: the weights are loaded once, before the first variant.
    pub host_peak_bytes: Option<u64>,
    /// Process resident set (VmRSS) after the variant ran.
    pub host_rss_bytes: Option<u64>,
    /// GPU memory in use after the variant ran, device-wide (total − free, CUDA context and other
    /// processes included; CUDA only).
    pub gpu_bytes: Option<u64>,
    /// GPU memory this process allocated (in use now less in use when the device was set up: weights,
    /// caches, buffers, graph; CUDA only).
    pub gpu_process_bytes: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub plan: String,
    pub dtype: String,
    /// The projections' quantized type (`--quant`), None when they are in `dtype`.
    pub quant: Option<String>,
    pub device: String,
    pub threads: usize,
    /// The CPU kernels' tier, the CPU and its vector features (`kernels::tier::describe`).
    pub cpu: String,
    pub options: BenchOptions,
    pub rows: Vec<BenchRow>,
    pub memory: Vec<MemoryRow>,
    /// Device-to-device copy bandwidth measured in this run, counting bytes read and written (CUDA).
    pub copy_bandwidth_bytes_per_sec: Option<f64>,
    /// GPU memory this process had allocated once every variant was built, before any test ran (the
    /// weights, nothing else if loading leaves nothing behind; CUDA only). The memory rows' readings
    /// less this are what running the tests added (workspaces, buffers, graphs, loaded kernels).
    pub gpu_process_after_load_bytes: Option<u64>,
    /// The CUDA memory pool's (reserved, in use) bytes at the same moment (`device::gpu_pool_bytes`).
    pub gpu_pool_after_load_bytes: Option<(u64, u64)>,
    /// Self-check failures or fast-path errors that sent a decode row to the reference path.
    pub notices: Vec<String>,
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

/// Bytes one decoded token of `model` streams (see [`MemoryRow::streamed_per_token_bytes`]).
pub fn streamed_per_token(model: &Model) -> usize {
    let size = model.dtype.size_in_bytes();
    let blocks: usize = model.blocks.iter().filter(|b| model.runs(b)).flat_map(|b| b.tensors()).map(|t| t.bytes()).sum();
    // The embedding streams one row per token.
    blocks + WeightRef::of(&model.lm_head).bytes() + (model.norm.elem_count() + model.config.hidden_size) * size
}

/// The KV cache of `tokens` positions for the blocks `model` runs.
fn kv_cache_bytes(model: &Model, tokens: usize) -> usize {
    let c = &model.config;
    let executed = model.blocks.iter().filter(|b| model.runs(b)).count();
    2 * executed * c.num_key_value_heads * tokens * c.head_dim * model.dtype.size_in_bytes()
}

/// Distinct weight bytes and executed parameter count of `model` as it runs.
pub fn executed_weights(model: &Model) -> (usize, usize) {
    let mut params = model.embed_tokens.elem_count() + model.norm.elem_count();
    if model.lm_head.dense().is_none_or(|w| w.id() != model.embed_tokens.id()) {
        params += model.lm_head.dims().0 * model.lm_head.dims().1;
    }
    let mut run = vec![WeightRef::Dense(&model.embed_tokens), WeightRef::Dense(&model.norm), WeightRef::of(&model.lm_head)];
    for b in model.blocks.iter().filter(|b| model.runs(b)) {
        params += b.tensors().iter().map(|t| t.elem_count()).sum::<usize>();
        run.extend(b.tensors());
    }
    (crate::model::weights_bytes(run), params)
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

/// Fills `cache` with `depth` tokens (untimed); `salt` picks which (sequences of a batch differ).
fn fill(model: &Model, cache: &mut Cache, depth: usize, salt: u64) -> Result<()> {
    if depth > 0 {
        let ids = tokens(depth, model.config.vocab_size, salt);
        model.forward(&ids_tensor(&ids, &model.device)?, cache, Logits::Last)?;
    }
    Ok(())
}

/// One prefill of `n` tokens after `depth`; returns seconds.
fn run_prefill(model: &Model, n: usize, depth: usize) -> Result<f64> {
    let mut cache = Cache::new(model, depth + n)?;
    fill(model, &mut cache, depth, 7)?;
    let ids = ids_tensor(&tokens(n, model.config.vocab_size, 1), &model.device)?;
    sync(&model.device)?;
    let t = Instant::now();
    let logits = model.forward(&ids, &mut cache, Logits::Last)?;
    drop(logits);
    sync(&model.device)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Tokens of the random prompt the fast path's self-check runs on in a bench.
const CHECK_PROMPT: usize = 16;

/// What runs the decode test of one variant on one path.
enum Decoder<'m> {
    Reference,
    Step(Box<DecodeStep<'m>>),
}

/// The decoder of `path` for `model` on `cache`: the fused step, checked against the reference path
/// the first time this process uses it on the device (a failure is a notice, and the reference path).
fn decoder<'m>(model: &'m Model, path: DecodePath, cache: &mut Cache, notices: &mut Vec<String>) -> Result<(DecodePath, Decoder<'m>)> {
    let path = path.resolve(model)?;
    if path == DecodePath::Reference {
        return Ok((path, Decoder::Reference));
    }
    let opts = StepOptions::default();
    let key = check::key(model, path, crate::step::splits_for(model, cache.capacity(), &opts));
    let fail = |notices: &mut Vec<String>, why: String| {
        check::remember(&key, false);
        notices.push(format!("{}: {why}", path.as_str()));
        Ok((DecodePath::Reference, Decoder::Reference))
    };
    if check::known(&key) == Some(false) {
        return fail(notices, "failed earlier in this process; ran the reference path".into());
    }
    let mut step = match DecodeStep::new(model, cache, path, &opts) {
        Ok(s) => s,
        Err(e @ (Error::Flag { .. } | Error::FastPathCrashed(_))) => return Err(e),
        Err(e) => return fail(notices, format!("{e}; ran the reference path")),
    };
    if check::known(&key).is_none() {
        // The step the rows time, on the cache they use (its splits; on CUDA its graph).
        let prompt = tokens(CHECK_PROMPT.min(model.config.max_position_embeddings - 2), model.config.vocab_size, 3);
        let verdict = check::check_step(model, &mut step, cache, &opts, &prompt);
        cache.reset();
        match verdict {
            Ok(v) => {
                check::remember(&key, v.pass);
                if !v.pass {
                    return fail(notices, v.warning());
                }
            }
            Err(e @ (Error::Flag { .. } | Error::FastPathCrashed(_))) => return Err(e),
            Err(e) => return fail(notices, format!("{e}; ran the reference path")),
        }
    }
    Ok((path, Decoder::Step(Box::new(step))))
}

/// `n` single-token decode steps after `depth`; returns seconds. Like llama-bench's tg test, the next
/// token is fixed rather than sampled, so only the model is timed; the fused step still returns its
/// device argmax each token, as greedy generation does.
fn run_decode(model: &Model, decoder: &mut Decoder, cache: &mut Cache, n: usize, depth: usize) -> Result<f64> {
    cache.reset();
    fill(model, cache, depth, 7)?;
    let ids = tokens(n, model.config.vocab_size, 2);
    let tensors: Vec<Tensor> = ids.iter().map(|&i| ids_tensor(&[i], &model.device)).collect::<Result<_>>()?;
    sync(&model.device)?;
    let t = Instant::now();
    match decoder {
        Decoder::Reference => {
            for id in &tensors {
                drop(model.forward(id, cache, Logits::Last)?);
            }
        }
        Decoder::Step(step) => {
            for &id in &ids {
                if let StepOut::Logits(_) = step.decode(cache, id, false)? {
                    return Err(Error::internal("decode step: asked for a token, got logits"));
                }
            }
        }
    }
    sync(&model.device)?;
    Ok(t.elapsed().as_secs_f64())
}

/// `n` decode steps of every cache in `caches` together by `decode` (`Model::decode_rows`, serve's
/// batched step, or the batched fused step) after `depth` tokens each; returns seconds. Each
/// sequence's next token is fixed, as in `run_decode`.
fn run_batched(model: &Model, caches: &mut [Cache], n: usize, depth: usize, mut decode: impl FnMut(&[u32], &mut [&mut Cache]) -> Result<()>) -> Result<f64> {
    for (i, c) in caches.iter_mut().enumerate() {
        c.reset();
        fill(model, c, depth, 7 + i as u64)?;
    }
    let ids: Vec<Vec<u32>> = (0..caches.len()).map(|i| tokens(n, model.config.vocab_size, 2 + 100 * i as u64)).collect();
    let mut refs: Vec<&mut Cache> = caches.iter_mut().collect();
    sync(&model.device)?;
    let t = Instant::now();
    for step in 0..n {
        let step_ids: Vec<u32> = ids.iter().map(|s| s[step]).collect();
        decode(&step_ids, &mut refs)?;
    }
    sync(&model.device)?;
    Ok(t.elapsed().as_secs_f64())
}

/// The batched test of `b` sequences on the batched fused step of `requested` (CUDA only: on other
/// devices sequences batch through the reference path, the row before it), after that path's
/// one-cache step passed its check in this process (the tg rows); None where it does not run.
#[allow(clippy::too_many_arguments)] // the test's context, as the loop that calls it holds it
fn batched_step_row<F: FnMut(&str, u64, u64)>(
    p: &Prepared,
    params: usize,
    opts: &BenchOptions,
    requested: DecodePath,
    b: usize,
    test: &str,
    notices: &mut Vec<String>,
    tally: &mut Tally<'_, F>,
) -> Result<Option<BenchRow>> {
    let model = &p.model;
    let path = requested.resolve(model)?;
    if path == DecodePath::Reference || !model.device.is_cuda() {
        return Ok(None);
    }
    let capacity = opts.depth + opts.decode;
    let label = format!("{} {test} {}", p.variant.name(), path.as_str());
    let mut skip = |why: String| {
        notices.push(format!("{label}: {why}"));
        // The test's ticks, so that the progress still reaches its total.
        (0..opts.warmup + opts.repetitions).for_each(|_| tally.tick(&label));
        Ok(None)
    };
    let key = check::key(model, path, crate::step::splits_for(model, capacity, &StepOptions::default()));
    if check::known(&key) != Some(true) {
        return skip(format!("the batched {} step runs after its one-cache step passed its check; it did not", path.as_str()));
    }
    let built = Cache::pool(model, b, capacity)
        .and_then(|pool| Ok((DecodeStep::batched(model, &pool.iter().collect::<Vec<_>>(), path, &StepOptions::default())?, pool)));
    let (mut step, mut pool) = match built {
        Ok(b) => b,
        Err(e @ (Error::Flag { .. } | Error::FastPathCrashed(_))) => return Err(e),
        Err(e) => return skip(format!("{e}; no batched {} row", path.as_str())),
    };
    let mut by_step = |tokens: &[u32], caches: &mut [&mut Cache]| step.decode_batch(caches, tokens, false).map(drop);
    let samples = repeat(opts, opts.decode * b, || run_batched(model, &mut pool, opts.decode, opts.depth, &mut by_step), || tally.tick(&label))?;
    let mut r = new_row(p, params, test.to_string(), opts.decode * b, path, samples);
    r.batch = b;
    r.launches_per_token = Some(step.launches_per_token());
    r.graph_nodes = step.graph_nodes();
    Ok(Some(r))
}

/// Rounds each op kind is timed (the median kept).
const OP_ROUNDS: usize = 5;

/// `step`'s op kinds timed at `pos` (the last position a decode test ran; `cache` is reset before the
/// next test), beside the roofline of that context.
fn op_profile(model: &Model, step: &mut DecodeStep, cache: &Cache, pos: usize, bandwidth: Option<f64>) -> Result<Vec<OpProfile>> {
    let times = step.op_times(cache, 1, pos, OP_ROUNDS)?;
    let layers = step.plan().ops.iter().filter(|o| o.name == OpName::QkvProj).count();
    // Bytes per projection weight: the model dtype's, or a quantized model's average over its
    // projections (a Q4_K_M file mixes Q4_K and Q6_K: each op is charged the average).
    let elem = model.dtype.size_in_bytes();
    let (bytes, values) = model.projections().map(WeightRef::of).fold((0usize, 0usize), |(b, v), w| (b + w.bytes(), v + w.elem_count()));
    let weight = if values == 0 { elem as f64 } else { bytes as f64 / values as f64 };
    let rows = roofline::roofline(step.dims(), elem, weight, pos + 1, layers, step.plan().splits);
    roofline::profile(&rows, &times, bandwidth).map_err(Error::internal)
}

fn stats(samples: &[f64]) -> (f64, f64, f64) {
    let n = samples.len().max(1) as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 { samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (samples.len() - 1) as f64 } else { 0.0 };
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

/// Checks `opts` against the model before anything runs.
fn check_options(model: &Model, opts: &BenchOptions) -> Result<()> {
    let max = model.config.max_position_embeddings;
    for (flag, need) in [("-p", opts.depth + opts.prefill), ("-n", opts.depth + opts.decode)] {
        if need > max {
            return Err(Error::flag(flag, format!("depth + tokens = {need} exceeds max_position_embeddings {max}")));
        }
    }
    if opts.repetitions == 0 {
        return Err(Error::flag("-r", "at least one repetition"));
    }
    if opts.batch.contains(&0) {
        return Err(Error::flag("-b", "at least one sequence"));
    }
    if !opts.batch.is_empty() && opts.decode == 0 {
        return Err(Error::flag("-b", "the batched test decodes -n tokens per sequence, and -n is 0"));
    }
    if opts.prefill == 0 && opts.decode == 0 {
        return Err(Error::flag("-p/-n", "nothing to run: both are 0"));
    }
    if model.skips_transparent() && opts.variants.contains(&Variant::Expanded) {
        return Err(Error::flag(
            "--skip-transparent",
            "the model was loaded without its zero projections, so the expanded variant cannot run; use --variants base,skip or drop the flag",
        ));
    }
    for p in &opts.paths {
        p.resolve(model)?;
    }
    Ok(())
}

/// Times one test `warmup + repetitions` times; returns tokens per second of the timed runs.
fn repeat(opts: &BenchOptions, n: usize, mut once: impl FnMut() -> Result<f64>, mut tick: impl FnMut()) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(opts.repetitions);
    for rep in 0..opts.warmup + opts.repetitions {
        let secs = once()?;
        if rep >= opts.warmup {
            samples.push(n as f64 / secs.max(1e-12));
        }
        tick();
    }
    Ok(samples)
}

/// Runs every test of every variant. `progress` is told each finished repetition (and the total).
pub fn measure(target: &BenchTarget, opts: &BenchOptions, mut progress: impl FnMut(&str, u64, u64)) -> Result<BenchReport> {
    let model = target.model;
    check_options(model, opts)?;
    let prepared = prepare(model, target.plan, &opts.variants)?;
    // Each batch size: the reference rows, and on CUDA one per fused path (`batched_step_row`).
    let fused = if model.device.is_cuda() { opts.paths.iter().filter(|p| p.resolve(model).is_ok_and(|p| p != DecodePath::Reference)).count() } else { 0 };
    let tests_per_variant = usize::from(opts.prefill > 0) + if opts.decode > 0 { opts.paths.len() + opts.batch.len() * (1 + fused) } else { 0 };
    let total = (prepared.len() * tests_per_variant * (opts.warmup + opts.repetitions)) as u64;
    let mut tally = Tally { done: 0, total, report: &mut progress };
    crate::device::synchronize(&model.device)?;
    let after_load = crate::device::gpu_memory_allocated(&model.device);
    let pool_after_load = crate::device::gpu_pool_bytes(&model.device);
    let bandwidth = crate::device::copy_bandwidth(&model.device)?;
    let (mut rows, mut memory, mut notices) = (Vec::new(), Vec::new(), Vec::new());
    for p in &prepared {
        let (weights_held_bytes, params) = executed_weights(&p.model);
        let streamed = streamed_per_token(&p.model);
        if opts.prefill > 0 {
            let test = opts.test_name("pp", opts.prefill);
            let label = format!("{} {test}", p.variant.name());
            let samples = repeat(opts, opts.prefill, || run_prefill(&p.model, opts.prefill, opts.depth), || tally.tick(&label))?;
            rows.push(new_row(p, params, test, opts.prefill, DecodePath::Reference, samples));
        }
        if opts.decode > 0 {
            let mut cache = Cache::new(&p.model, opts.depth + opts.decode)?;
            for &requested in &opts.paths {
                let (path, mut dec) = decoder(&p.model, requested, &mut cache, &mut notices)?;
                let test = opts.test_name("tg", opts.decode);
                let label = format!("{} {test} {}", p.variant.name(), path.as_str());
                let samples = repeat(opts, opts.decode, || run_decode(&p.model, &mut dec, &mut cache, opts.decode, opts.depth), || tally.tick(&label))?;
                let mut r = new_row(p, params, test, opts.decode, path, samples);
                if let Decoder::Step(step) = &mut dec {
                    r.launches_per_token = Some(step.launches_per_token());
                    r.graph_nodes = step.graph_nodes();
                    r.op_profile = Some(op_profile(&p.model, step, &cache, opts.depth + opts.decode - 1, bandwidth)?);
                }
                r.bandwidth_fraction = bandwidth.map(|bw| r.mean_tps * streamed as f64 / bw);
                rows.push(r);
            }
            for &b in &opts.batch {
                let mut caches = (0..b).map(|_| Cache::new(&p.model, opts.depth + opts.decode)).collect::<Result<Vec<_>>>()?;
                let test = format!("{}x{b}", opts.test_name("tg", opts.decode));
                let label = format!("{} {test}", p.variant.name());
                let by_rows = |tokens: &[u32], caches: &mut [&mut Cache]| p.model.decode_rows(tokens, caches).map(drop);
                let samples = repeat(opts, opts.decode * b, || run_batched(&p.model, &mut caches, opts.decode, opts.depth, by_rows), || tally.tick(&label))?;
                let mut r = new_row(p, params, test.clone(), opts.decode * b, DecodePath::Reference, samples);
                r.batch = b;
                rows.push(r);
                drop(caches); // the batched step's pool takes their place
                for &requested in &opts.paths {
                    if let Some(r) = batched_step_row(p, params, opts, requested, b, &test, &mut notices, &mut tally)? {
                        rows.push(r);
                    }
                }
            }
        }
        memory.push(memory_row(p, weights_held_bytes, streamed, opts.depth + opts.decode, &model.device));
    }
    set_ratios(&mut rows);
    Ok(BenchReport {
        model: target.name.clone(),
        plan: target.plan.spec.clone(),
        dtype: crate::config::dtype_hf_name(model.dtype).to_string(),
        quant: model.quant_type().map(|q| q.name().to_string()),
        device: crate::device::name(&model.device),
        threads: candle_core::utils::get_num_threads(),
        cpu: crate::kernels::tier::describe(),
        options: opts.clone(),
        rows,
        memory,
        copy_bandwidth_bytes_per_sec: bandwidth,
        gpu_process_after_load_bytes: after_load,
        gpu_pool_after_load_bytes: pool_after_load,
        notices,
    })
}

impl BenchOptions {
    /// llama-bench's test name: `pp512`, `tg128`, with `@d<depth>` after a filled context.
    fn test_name(&self, kind: &str, tokens: usize) -> String {
        if self.depth > 0 {
            format!("{kind}{tokens}@d{}", self.depth)
        } else {
            format!("{kind}{tokens}")
        }
    }
}

/// Finished repetitions over the whole run, told to the caller's progress callback.
struct Tally<'f, F: FnMut(&str, u64, u64)> {
    done: u64,
    total: u64,
    report: &'f mut F,
}

impl<F: FnMut(&str, u64, u64)> Tally<'_, F> {
    fn tick(&mut self, label: &str) {
        self.done += 1;
        (self.report)(label, self.done, self.total);
    }
}

/// A row of `p`'s results on one test (the step's counters and the bandwidth fraction left unset).
fn new_row(p: &Prepared, params: usize, test: String, tokens: usize, path: DecodePath, samples: Vec<f64>) -> BenchRow {
    let (mean_tps, sd_tps, median_tps) = stats(&samples);
    BenchRow {
        variant: p.variant,
        layers: p.model.blocks.len(),
        executed_layers: p.model.blocks.iter().filter(|b| p.model.runs(b)).count(),
        params,
        test,
        path,
        launches_per_token: None,
        graph_nodes: None,
        bandwidth_fraction: None,
        tokens,
        batch: 1,
        samples,
        mean_tps,
        sd_tps,
        median_tps,
        ratio_to_base: None,
        op_profile: None,
    }
}

/// `p`'s memory after its tests: what it holds and streams, the KV cache for `tokens`, the host's and
/// (on CUDA) the GPU's.
fn memory_row(p: &Prepared, weights_held_bytes: usize, streamed: usize, tokens: usize, device: &candle_core::Device) -> MemoryRow {
    let status = HostMemory::read();
    MemoryRow {
        variant: p.variant,
        weights_held_bytes,
        streamed_per_token_bytes: streamed,
        kv_cache_bytes: kv_cache_bytes(&p.model, tokens),
        host_peak_bytes: status.peak,
        host_rss_bytes: status.rss,
        gpu_bytes: crate::device::gpu_memory_used(device),
        gpu_process_bytes: crate::device::gpu_memory_allocated(device),
    }
}

/// Each row's mean over the base variant's on the same test and path.
fn set_ratios(rows: &mut [BenchRow]) {
    let base: Vec<(String, DecodePath, f64)> = rows.iter().filter(|r| r.variant == Variant::Base).map(|r| (r.test.clone(), r.path, r.mean_tps)).collect();
    for r in rows.iter_mut() {
        r.ratio_to_base = base.iter().find(|(t, p, _)| *t == r.test && *p == r.path).map(|(_, _, b)| r.mean_tps / b.max(1e-12));
    }
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
        writeln!(f, "| model | plan | variant | layers | params | dtype | device | test | path | t/s | ratio | launches/token | of copy bandwidth |")?;
        writeln!(f, "|---|---|---|---:|---:|---|---|---|---|---:|---:|---:|---:|")?;
        // A batched row's t/s counts every sequence's tokens; each sequence's own rate follows it.
        for r in &self.rows {
            let layers = if r.executed_layers == r.layers { r.layers.to_string() } else { format!("{} ({} run)", r.layers, r.executed_layers) };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} ± {:.2}{} | {} | {} | {} |",
                self.model,
                self.plan,
                r.variant.name(),
                layers,
                crate::expand::human_params(r.params),
                self.quant.as_ref().map_or(self.dtype.clone(), |q| format!("{} + {q}", self.dtype)),
                self.device,
                r.test,
                r.path.as_str(),
                r.mean_tps,
                r.sd_tps,
                if r.batch > 1 { format!(" ({:.2} per sequence)", r.mean_tps / r.batch as f64) } else { String::new() },
                r.ratio_to_base.map_or("-".into(), |x| format!("{x:.3}")),
                r.launches_per_token.map_or("-".into(), |x| x.to_string()),
                r.bandwidth_fraction.map_or("-".into(), |x| format!("{:.1} %", 100.0 * x)),
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "| variant | weights held | streamed per token | KV cache | host peak (VmHWM) | host RSS | GPU allocated by expanse | GPU in use (device-wide) |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
        for m in &self.memory {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                m.variant.name(),
                crate::expand::human_bytes(m.weights_held_bytes),
                crate::expand::human_bytes(m.streamed_per_token_bytes),
                crate::expand::human_bytes(m.kv_cache_bytes),
                opt_bytes(m.host_peak_bytes),
                opt_bytes(m.host_rss_bytes),
                opt_bytes(m.gpu_process_bytes),
                opt_bytes(m.gpu_bytes)
            )?;
        }
        for r in self.rows.iter().filter(|r| r.op_profile.is_some()) {
            let ops = r.op_profile.as_deref().unwrap_or_default();
            let context = self.options.depth + self.options.decode;
            writeln!(
                f,
                "\nop profile, {} {} {} (context {context}; each kind timed alone):\n```\n{}```",
                r.variant.name(),
                r.test,
                r.path.as_str(),
                roofline::profile_table(ops)
            )?;
        }
        writeln!(f, "\nCPU: {}", self.cpu)?;
        if let Some(bw) = self.copy_bandwidth_bytes_per_sec {
            writeln!(f, "\ndevice copy bandwidth (read + write, measured in this run): {:.0} GB/s", bw / 1e9)?;
        }
        if let Some(b) = self.gpu_process_after_load_bytes {
            let pool = self.gpu_pool_after_load_bytes.map(|(r, u)| format!(" (memory pool: {} reserved, {} in use)", opt_bytes(Some(r)), opt_bytes(Some(u))));
            writeln!(f, "\nGPU allocated once loaded, before the tests: {}{}", opt_bytes(Some(b)), pool.unwrap_or_default())?;
        }
        for n in &self.notices {
            writeln!(f, "\nnote: {n}")?;
        }
        write!(
            f,
            "\n{} warmup + {} repetitions per test; host memory is per process (all variants share one load)",
            self.options.warmup, self.options.repetitions
        )
    }
}
