//! `expanse verify`: proves or refutes that an expanded model behaves exactly like its base, by running
//! both on the same tokens and comparing their logits position by position, and measures what every
//! inserted block adds to the residual stream.
//!
//! The base is the same loaded model with its inserted blocks left out (`Model::with_blocks`), so the two
//! share every weight and run the same kernels on the same inputs: any difference is the inserted blocks'.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use clap::Args;
use indicatif::ProgressBar;

use crate::compare;
use crate::engine::{self, ids_tensor, LoadOptions, Source};
use crate::error::{Error, Result};
use crate::expand::{layer_tensor_name, LAYER_TENSORS};
use crate::model::{BlockTrace, Cache, Logits, Model, WeightRef};
use crate::template::{ChatTemplate, Message, TemplateOrigin};
use crate::tokenizer::Tokenizer;

use super::args::{check_tolerance, ModelArgs};
use super::{print_report, Failure};

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub(super) model: ModelArgs,
    /// Random weights in a preset's or config.json's shapes instead of --model (prompts are random ids)
    #[arg(long, value_name = "PRESET|CONFIG.json", conflicts_with_all = ["model", "revision", "base", "against"])]
    synthetic: Option<String>,
    /// Prompt text (repeatable); default: built-in short, long, multilingual and code prompts
    #[arg(long, num_args = 1.., conflicts_with_all = ["prompts", "ids"])]
    prompt: Vec<String>,
    /// File with one prompt per line
    #[arg(long, conflicts_with = "ids")]
    prompts: Option<PathBuf>,
    /// Token ids, comma-separated (repeatable: one sequence per flag), used as given
    #[arg(long)]
    ids: Vec<String>,
    /// Tokenize prompts as they are (with BOS) instead of the chat template
    #[arg(long, conflicts_with = "ids")]
    raw: bool,
    /// Greedy continuation steps after each prompt (tokens chosen by the base, fed to both)
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Largest |Δlogit| that passes; 0 demands bit-exact logits
    #[arg(long, default_value_t = 0.0)]
    tolerance: f32,
    /// Also compare with a checkpoint merged on disk (e.g. mergekit's output), tensor by tensor and logit by logit
    #[arg(long, value_name = "DIR")]
    against: Option<String>,
    /// The base checkpoint, instead of the model without its inserted blocks
    #[arg(long, value_name = "DIR")]
    base: Option<String>,
    #[arg(long)]
    json: bool,
}

/// `expanse verify`
pub fn run(args: VerifyArgs) -> Result<(), Failure> {
    let VerifyArgs { model, synthetic, prompt, prompts, ids, raw, steps, tolerance, against, base, json } = args;
    check_tolerance(tolerance)?;
    let prompts = prompts_from_flags(prompt, prompts, &ids)?;
    let opts = VerifyOptions { load: model.options(false), synthetic, prompts, raw, steps, tolerance, against, base };
    let bar = crate::progress::bar(None, "verify {bar:30} {pos}/{len} prompts {msg}");
    let result = verify(&opts, Some(&bar));
    bar.finish_and_clear();
    let report = result?;
    for n in &report.notices {
        eprintln!("{n}");
    }
    print_report(&report, json)?;
    if !report.verdict.pass {
        return Err(Failure::Check(report.verdict.message.clone()));
    }
    Ok(())
}

/// `--ids`, else `--prompts FILE`, else `--prompt`s, else the built-in set.
fn prompts_from_flags(prompt: Vec<String>, prompts: Option<PathBuf>, ids: &[String]) -> Result<Prompts> {
    Ok(if !ids.is_empty() {
        Prompts::Ids(ids.iter().map(|s| engine::parse_ids(s)).collect::<Result<_>>()?)
    } else if let Some(file) = prompts {
        Prompts::Texts(read_prompts_file(&file)?)
    } else if !prompt.is_empty() {
        Prompts::Texts(prompt)
    } else {
        Prompts::Builtin
    })
}

/// Where the prompts come from.
#[derive(Debug, Clone)]
pub enum Prompts {
    /// The built-in set: short, long past the sliding window, multilingual, code.
    Builtin,
    /// `--prompt TEXT…` / `--prompts FILE`, tokenized (and chat-rendered unless raw).
    Texts(Vec<String>),
    /// `--ids 1,2,3` (one sequence per flag), used as given.
    Ids(Vec<Vec<u32>>),
}

/// Everything `expanse verify` was asked, as plain data.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub load: LoadOptions,
    /// `--synthetic PRESET|CONFIG.json` instead of a checkpoint.
    pub synthetic: Option<String>,
    pub prompts: Prompts,
    /// Tokenize prompts as they are, without the chat template.
    pub raw: bool,
    /// Greedy continuation steps after each prompt.
    pub steps: usize,
    /// The largest |Δlogit| that still passes; 0 demands bit-exact logits.
    pub tolerance: f32,
    /// `--against DIR`: a checkpoint merged on disk to compare with the in-memory expansion.
    pub against: Option<String>,
    /// `--base DIR`: the base checkpoint, instead of the model minus its inserted blocks.
    pub base: Option<String>,
}

impl VerifyOptions {
    pub fn new(load: LoadOptions) -> Self {
        VerifyOptions { load, synthetic: None, prompts: Prompts::Builtin, raw: false, steps: 8, tolerance: 0.0, against: None, base: None }
    }
}

/// One tokenized prompt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prompt {
    pub name: String,
    pub ids: Vec<u32>,
}

/// A model to compare with the base, and which of its output layers are the inserted blocks.
pub struct Subject<'a> {
    pub name: String,
    pub model: &'a Model,
    pub inserted: Vec<usize>,
}

/// Logit agreement over a set of positions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LogitStats {
    pub positions: usize,
    /// max over positions and vocab of |logit_base − logit_model| (f32).
    pub max_abs_diff: f32,
    /// KL(p_base ‖ p_model) per position (softmax of the f32 logits), averaged over positions.
    pub kl_mean: f64,
    pub kl_max: f64,
    /// Fraction of positions whose argmax agrees.
    pub top1_agreement: f64,
    /// Every logit of every position equal (−0.0 == 0.0).
    pub bit_exact: bool,
}

/// One prompt's comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromptReport {
    pub name: String,
    pub prompt_tokens: usize,
    pub steps: usize,
    #[serde(flatten)]
    pub stats: LogitStats,
    /// First position (prompt, then continuation) whose logits are not bit-identical.
    pub first_divergence: Option<usize>,
    /// First position whose argmax differs.
    pub first_top1_change: Option<usize>,
}

/// What one inserted block added to the residual stream, over every forward call of every prompt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlockReport {
    pub layer: usize,
    /// The checkpoint layer its weights came from (the layer it copies, for a block the plan inserted).
    pub source: usize,
    /// max over forward calls (each prefill, each step) of ‖out − in‖ / ‖in‖; exactly 0 when transparent.
    pub relative_delta: f64,
    /// mean over forward calls of the same ratio.
    pub relative_delta_mean: f64,
    /// Its output equalled its input bit for bit in every call.
    pub identical: bool,
}

/// A model against the base over all prompts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub name: String,
    pub overall: LogitStats,
    pub prompts: Vec<PromptReport>,
    pub blocks: Vec<BlockReport>,
}

/// One tensor of the on-disk checkpoint that differs from the in-memory expansion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorDiff {
    pub tensor: String,
    pub layer: Option<usize>,
    /// max |Δ| in f32, or None when the shapes differ.
    pub max_abs_diff: Option<f32>,
}

/// `--against DIR`: the merged checkpoint, tensor by tensor and logit by logit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgainstReport {
    pub path: String,
    pub layers: usize,
    pub tensors_compared: usize,
    pub differing_tensors: Vec<TensorDiff>,
    /// Output layers holding at least one differing tensor.
    pub differing_layers: Vec<usize>,
    pub comparison: Comparison,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub pass: bool,
    /// The inserted block (output layer) that moved the most, when the check failed.
    pub worst_block: Option<usize>,
    pub message: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub model: String,
    pub expand: String,
    pub device: String,
    pub dtype: String,
    /// The projections' quantized type (`--quant`; the base and `--against` are loaded the same way).
    pub quant: Option<String>,
    pub layers: usize,
    pub inserted: Vec<usize>,
    /// How the base was obtained.
    pub base: String,
    /// How prompts were rendered: `chat (OpenChat)` or `raw`.
    pub rendering: String,
    pub steps: usize,
    pub tolerance: f32,
    pub expanded: Comparison,
    pub against: Option<AgainstReport>,
    pub verdict: Verdict,
    /// Things the user should know (plan warnings, fallbacks); printed to stderr by the CLI.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
}

/// Per-position statistics of one forward call, computed on the model's device.
#[derive(Debug, Clone, Copy)]
struct PositionStat {
    max_abs: f32,
    kl: f64,
    top1: bool,
    exact: bool,
}

/// Compares base and model logits `[n, vocab]` row by row, through `compare` (a non-finite logit
/// makes its row's max |Δ| and KL NaN and its top-1 disagree). KL(p_base ‖ p_model) in f64, summed
/// on the host.
fn position_stats(base: &Tensor, model: &Tensor) -> Result<Vec<PositionStat>> {
    let width = base.dim(D::Minus1)?.max(1);
    let (a, b) = (compare::f32_values(base)?, compare::f32_values(model)?);
    let row = |(ra, rb): (&[f32], &[f32])| {
        let top = compare::argmax(ra);
        PositionStat {
            max_abs: compare::Diff::new(rb, ra).max_abs,
            kl: compare::kl(ra, rb),
            top1: top.is_some() && top == compare::argmax(rb),
            exact: ra == rb,
        }
    };
    Ok(a.chunks(width).zip(b.chunks(width)).map(row).collect())
}

/// Statistics of base vs model logits, both `[positions, vocab]`.
pub fn logit_stats(base: &Tensor, model: &Tensor) -> Result<LogitStats> {
    if base.dims() != model.dims() || base.rank() != 2 {
        return Err(candle_core::Error::Msg(format!("logit shapes differ or are not [positions, vocab]: {:?} vs {:?}", base.dims(), model.dims())).into());
    }
    Ok(summarize(&position_stats(base, model)?))
}

fn summarize(stats: &[PositionStat]) -> LogitStats {
    let n = stats.len();
    let max_abs_diff = compare::max_or_nan(stats.iter().map(|s| s.max_abs));
    let kl_max = compare::max_or_nan(stats.iter().map(|s| s.kl));
    LogitStats {
        positions: n,
        max_abs_diff,
        kl_mean: stats.iter().map(|s| s.kl).sum::<f64>() / n.max(1) as f64,
        kl_max,
        top1_agreement: stats.iter().filter(|s| s.top1).count() as f64 / n.max(1) as f64,
        bit_exact: stats.iter().all(|s| s.exact),
    }
}

/// Per-block running totals over forward calls.
#[derive(Clone)]
struct BlockAcc {
    layer: usize,
    source: usize,
    max: f64,
    sum: f64,
    calls: usize,
    identical: bool,
}

impl BlockAcc {
    /// Empty accumulators for `s`'s inserted blocks.
    fn for_subject(s: &Subject<'_>) -> Vec<BlockAcc> {
        let acc = |l: usize| BlockAcc { layer: l, source: s.model.blocks.get(l).map_or(l, |b| b.source), max: 0.0, sum: 0.0, calls: 0, identical: true };
        s.inserted.iter().map(|&l| acc(l)).collect()
    }

    fn add(&mut self, t: &BlockTrace) {
        self.max = compare::max_or_nan([self.max, t.relative_delta]);
        self.sum += t.relative_delta;
        self.calls += 1;
        self.identical &= t.identical;
    }

    fn report(&self) -> BlockReport {
        BlockReport {
            layer: self.layer,
            source: self.source,
            relative_delta: self.max,
            relative_delta_mean: self.sum / self.calls.max(1) as f64,
            identical: self.identical,
        }
    }
}

fn last_row(logits: &Tensor) -> Result<Tensor> {
    // `[1, s, vocab]` → `[1, vocab]` of the last position.
    let s = logits.dim(1)?;
    Ok(logits.narrow(1, s - 1, 1)?.squeeze(1)?)
}

/// The base's greedy choice from its last-position logits (one row), through `compare::argmax`: a NaN
/// there is an error naming it, where candle's argmax would hand back some token to feed on.
fn argmax_last(logits: &Tensor) -> Result<u32> {
    let row = compare::f32_values(logits)?;
    let best = compare::argmax(&row).ok_or_else(|| Error::internal("verify: the base model's logits hold NaN, so it has no greedy next token"))?;
    Ok(best as u32)
}

/// Runs `base` and every subject on each prompt, then `steps` greedy tokens chosen by the base (every
/// model is fed the same tokens), and compares each subject's logits with the base's at every position.
pub fn compare(base: &Model, subjects: &[Subject<'_>], prompts: &[Prompt], steps: usize, progress: Option<&ProgressBar>) -> Result<Vec<Comparison>> {
    if let Some(p) = prompts.iter().find(|p| p.ids.is_empty()) {
        return Err(Error::flag("--prompt", format!("prompt `{}` has no tokens", p.name)));
    }
    let mut per_prompt: Vec<Vec<PromptReport>> = vec![Vec::new(); subjects.len()];
    let mut all: Vec<Vec<PositionStat>> = vec![Vec::new(); subjects.len()];
    let mut accs: Vec<Vec<BlockAcc>> = subjects.iter().map(BlockAcc::for_subject).collect();
    for prompt in prompts {
        if let Some(p) = progress {
            p.set_message(prompt.name.clone());
        }
        let stats = compare_prompt(base, subjects, prompt, steps, &mut accs)?;
        for (k, st) in stats.into_iter().enumerate() {
            per_prompt[k].push(PromptReport {
                name: prompt.name.clone(),
                prompt_tokens: prompt.ids.len(),
                steps,
                stats: summarize(&st),
                first_divergence: st.iter().position(|s| !s.exact),
                first_top1_change: st.iter().position(|s| !s.top1),
            });
            all[k].extend(st);
        }
        if let Some(p) = progress {
            p.inc(1);
        }
    }
    Ok(subjects
        .iter()
        .enumerate()
        .map(|(k, s)| Comparison {
            name: s.name.clone(),
            overall: summarize(&all[k]),
            prompts: std::mem::take(&mut per_prompt[k]),
            blocks: accs[k].iter().map(BlockAcc::report).collect(),
        })
        .collect())
}

/// One prompt through `base` and every subject, then `steps` tokens the base chooses: each subject's
/// per-position statistics, with its inserted blocks' contributions added to `accs`.
fn compare_prompt(base: &Model, subjects: &[Subject<'_>], prompt: &Prompt, steps: usize, accs: &mut [Vec<BlockAcc>]) -> Result<Vec<Vec<PositionStat>>> {
    let capacity = prompt.ids.len() + steps;
    let mut base_cache = Cache::new(base, capacity)?;
    let mut caches: Vec<Cache> = subjects.iter().map(|s| Cache::new(s.model, capacity)).collect::<Result<_>>()?;
    let mut stats: Vec<Vec<PositionStat>> = vec![Vec::new(); subjects.len()];
    let mut tokens = prompt.ids.clone();
    for step in 0..=steps {
        // Step 0 is the prefill over every prompt position; each later step feeds one token.
        let (input, which) = if step == 0 { (&tokens[..], Logits::All) } else { (&tokens[tokens.len() - 1..], Logits::Last) };
        let ids = ids_tensor(input, &base.device)?;
        let b = base.forward(&ids, &mut base_cache, which)?;
        let b_rows = if which == Logits::All { b.squeeze(0)? } else { b.clone() };
        for (k, s) in subjects.iter().enumerate() {
            let mut trace = Vec::new();
            let ids = ids_tensor(input, &s.model.device)?;
            let m = s.model.forward_traced(&ids, &mut caches[k], which, Some(&mut trace))?;
            let m_rows = if which == Logits::All { m.squeeze(0)? } else { m };
            stats[k].extend(position_stats(&b_rows, &m_rows.to_device(&base.device)?)?);
            for acc in accs[k].iter_mut() {
                if let Some(t) = trace.iter().find(|t| t.layer == acc.layer) {
                    acc.add(t);
                }
            }
        }
        if step < steps {
            let last = if which == Logits::All { last_row(&b)? } else { b };
            tokens.push(argmax_last(&last)?);
        }
    }
    Ok(stats)
}

/// Output layers that look inserted: copies of the layer before them in every tensor that feeds the
/// block's computation (norms, q/k/v, gate/up), or blocks whose o_proj and down_proj are both zero.
/// Only the output projections are left out of the copy test because that is where a LLaMA-Pro block
/// starts at zero and where fine-tuning moves it first; a trained layer never repeats its predecessor.
pub fn detect_inserted(model: &Model) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for i in 1..model.blocks.len() {
        let (prev, cur) = (&model.blocks[i - 1].tensors(), &model.blocks[i].tensors());
        let mut copy = true;
        for (k, suffix) in LAYER_TENSORS.iter().enumerate() {
            if suffix.ends_with("o_proj.weight") || suffix.ends_with("down_proj.weight") {
                continue;
            }
            if !prev[k].values_equal(cur[k])? {
                copy = false;
                break;
            }
        }
        if copy || model.blocks[i].transparent {
            out.push(i);
        }
    }
    Ok(out)
}

/// Tensor by tensor: the in-memory expansion against a checkpoint loaded with `--expand none`.
fn diff_tensors(ours: &Model, theirs: &Model) -> Result<(usize, Vec<TensorDiff>)> {
    let mut compared = 0;
    let mut diffs = Vec::new();
    let mut check = |name: String, layer: Option<usize>, a: WeightRef, b: WeightRef| -> Result<()> {
        compared += 1;
        if !a.values_equal(b)? {
            let max_abs_diff = if a.dims() == b.dims() { Some(compare::Diff::of_tensors(&a.values()?, &b.values()?)?.max_abs) } else { None };
            diffs.push(TensorDiff { tensor: name, layer, max_abs_diff });
        }
        Ok(())
    };
    check("model.embed_tokens.weight".into(), None, WeightRef::Dense(&ours.embed_tokens), WeightRef::Dense(&theirs.embed_tokens))?;
    for (i, (a, b)) in ours.blocks.iter().zip(&theirs.blocks).enumerate() {
        for ((suffix, x), y) in LAYER_TENSORS.iter().zip(a.tensors()).zip(b.tensors()) {
            check(layer_tensor_name(i, suffix), Some(i), x, y)?;
        }
    }
    check("model.norm.weight".into(), None, WeightRef::Dense(&ours.norm), WeightRef::Dense(&theirs.norm))?;
    check("lm_head.weight".into(), None, WeightRef::of(&ours.lm_head), WeightRef::of(&theirs.lm_head))?;
    Ok((compared, diffs))
}

const SHORT: &str = "What is the capital of France?";
const MULTILINGUAL: &str =
    "Traduis en français : « The weather is lovely today. » 日本語で「ありがとう」はどういう意味ですか？ Как по-русски сказать «спасибо»? ¿Qué hora es?";
const CODE: &str = "Write a Rust function that returns the n-th Fibonacci number.\n```rust\nfn fib(n: u64) -> u64 {\n    match n {\n        0 => 0,\n        1 => 1,\n        _ => fib(n - 1) + fib(n - 2),\n    }\n}\n```\nNow make it iterative.";
const LONG_PARAGRAPH: &str = "The river wound through the valley for many miles, past orchards, mills and quiet villages whose bells rang at noon; travellers who followed it told of bridges of grey stone, of ferrymen who sang, and of a library at the river's mouth where every book about the sea was kept. ";

/// How prompts become tokens: with a chat template, the text as one user turn with the assistant
/// turn opened (the template writes BOS itself, so none is added); without one, the raw text with the
/// tokenizer's BOS.
pub fn encode_prompt(tok: &Tokenizer, text: &str, template: Option<&ChatTemplate>) -> Result<Vec<u32>> {
    match template {
        Some(t) => tok.encode(&t.render(&[Message::user(text)], true)?, false),
        None => tok.encode(text, true),
    }
}

struct Renderer<'a> {
    tok: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
}

impl Renderer<'_> {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_prompt(self.tok, text, self.template)
    }
}

/// The chat template verify renders prompts with: the checkpoint's (as `chat` would use it), or the
/// built-in OpenChat one when the tokenizer knows `<|end_of_turn|>`; None means raw text.
fn prompt_template(source: &Source, tok: &Tokenizer) -> Result<Option<ChatTemplate>> {
    let t = ChatTemplate::resolve(None, source.template_dir(), source.files.tokenizer_config.as_deref())?;
    let usable = match t.origin {
        TemplateOrigin::BuiltinOpenChat => tok.token_id("<|end_of_turn|>").is_some(),
        _ => !t.is_raw(),
    };
    Ok(usable.then_some(t))
}

/// Token count a "long" prompt aims for: past the sliding window, within the context.
fn long_target(model: &Model, steps: usize) -> (usize, usize) {
    let cap = model.config.max_position_embeddings.saturating_sub(steps);
    let target = model.config.sliding_window.map_or(512, |w| w + 32);
    (target.min(cap), cap)
}

fn builtin_text_prompts(r: &Renderer<'_>, model: &Model, steps: usize, notices: &mut Vec<String>) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for (name, text) in [("short", SHORT), ("multilingual", MULTILINGUAL), ("code", CODE)] {
        out.push(Prompt { name: name.into(), ids: r.encode(text)? });
    }
    let (target, cap) = long_target(model, steps);
    let one = r.encode(LONG_PARAGRAPH)?.len();
    let two = r.encode(&LONG_PARAGRAPH.repeat(2))?.len();
    let per = two.saturating_sub(one).max(1);
    let mut k = 1 + target.saturating_sub(one).div_ceil(per);
    let mut ids = r.encode(&LONG_PARAGRAPH.repeat(k))?;
    while ids.len() <= target && ids.len() < cap {
        k += 1;
        ids = r.encode(&LONG_PARAGRAPH.repeat(k))?;
    }
    while ids.len() > cap && k > 1 {
        k -= 1;
        ids = r.encode(&LONG_PARAGRAPH.repeat(k))?;
    }
    if ids.len() <= cap {
        out.push(Prompt { name: format!("long ({} tokens)", ids.len()), ids });
    } else {
        notices.push(format!("the long prompt does not fit in {cap} positions: left out"));
    }
    Ok(out)
}

/// Seeded random token ids (no tokenizer): a short prompt and one past the sliding window.
fn random_prompts(model: &Model, steps: usize) -> Vec<Prompt> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = model.config.vocab_size as u32;
    let (target, _) = long_target(model, steps);
    let mut gen = |n: usize| -> Vec<u32> { std::iter::once(1u32.min(vocab - 1)).chain((1..n).map(|_| rng.random_range(3.min(vocab - 1)..vocab))).collect() };
    let short = 16.min(target.max(1));
    let mut out = vec![Prompt { name: format!("random ({short} ids)"), ids: gen(short) }];
    if target > short {
        out.push(Prompt { name: format!("random long ({target} ids)"), ids: gen(target) });
    }
    out
}

fn check_prompts(prompts: &[Prompt], model: &Model, steps: usize, flag: &str) -> Result<()> {
    let vocab = model.config.vocab_size as u32;
    let max = model.config.max_position_embeddings;
    for p in prompts {
        if p.ids.is_empty() {
            return Err(Error::flag(flag, format!("prompt `{}` has no tokens", p.name)));
        }
        if let Some(bad) = p.ids.iter().find(|&&i| i >= vocab) {
            return Err(Error::flag(flag, format!("token id {bad} is out of range for vocab size {vocab}")));
        }
        if p.ids.len() + steps > max {
            return Err(Error::flag("--steps", format!("prompt `{}` ({} tokens) + {steps} steps exceeds max_position_embeddings {max}", p.name, p.ids.len())));
        }
    }
    Ok(())
}

/// The verdict: PASS when every comparison is within tolerance (bit-exact at 0) and the on-disk
/// checkpoint holds the same tensors; otherwise FAIL naming the block that moved the most.
fn verdict(expanded: &Comparison, against: Option<&AgainstReport>, tolerance: f32) -> Verdict {
    let within = |s: &LogitStats| s.max_abs_diff <= tolerance && (tolerance > 0.0 || s.bit_exact) && s.kl_max.is_finite() && !s.max_abs_diff.is_nan();
    let worst = |c: &Comparison| {
        c.blocks
            .iter()
            .filter(|b| !b.identical || b.relative_delta != 0.0)
            .max_by(|a, b| a.relative_delta.partial_cmp(&b.relative_delta).unwrap_or(std::cmp::Ordering::Greater))
            .cloned()
    };
    let describe = |c: &Comparison| -> (Option<usize>, String) {
        match worst(c) {
            Some(b) => (Some(b.layer), format!("worst block: layer {}{}, ‖out−in‖/‖in‖ up to {:.3e}", b.layer, copy_note(&b), b.relative_delta)),
            None => (None, "every inserted block returned its input bit for bit: the rest of the stack differs".into()),
        }
    };
    let fail = |what: String, c: &Comparison| {
        let (worst_block, why) = describe(c);
        let s = &c.overall;
        Verdict {
            pass: false,
            worst_block,
            message: format!(
                "FAIL: {what}: max |Δlogit| {:.3e} (tolerance {tolerance}), top-1 agreement {:.1}%, KL mean {:.3e}; {why}",
                s.max_abs_diff,
                100.0 * s.top1_agreement,
                s.kl_mean
            ),
        }
    };
    if !within(&expanded.overall) {
        return fail(expanded.name.clone(), expanded);
    }
    if let Some(a) = against {
        if !a.differing_tensors.is_empty() {
            let (worst_block, why) = match worst(&a.comparison) {
                Some(b) => (Some(b.layer), format!("; worst block: layer {}, ‖out−in‖/‖in‖ up to {:.3e}", b.layer, b.relative_delta)),
                None => (a.differing_layers.first().copied(), String::new()),
            };
            let layers = if a.differing_layers.is_empty() {
                "no layer (embeddings, final norm or lm_head)".to_string()
            } else {
                format!("layer(s) {}", join(&a.differing_layers))
            };
            return Verdict {
                pass: false,
                worst_block,
                message: format!("FAIL: {} differs from the in-memory expansion in {} tensor(s), in {layers}{why}", a.path, a.differing_tensors.len()),
            };
        }
        if !within(&a.comparison.overall) {
            return fail(a.comparison.name.clone(), &a.comparison);
        }
    }
    let s = &expanded.overall;
    let how = if s.bit_exact { "bit-exact".to_string() } else { format!("within tolerance {tolerance} (max |Δlogit| {:.3e})", s.max_abs_diff) };
    Verdict {
        pass: true,
        worst_block: None,
        message: format!(
            "PASS: {} is {how} with its base over {} prompt(s), {} positions{}",
            expanded.name,
            expanded.prompts.len(),
            s.positions,
            if against.is_some() { "; the on-disk checkpoint matches tensor for tensor" } else { "" }
        ),
    }
}

/// ` (copy of layer N)` for a block the plan copied; nothing for a checkpoint's own layer.
fn copy_note(b: &BlockReport) -> String {
    if b.source == b.layer {
        String::new()
    } else {
        format!(" (copy of layer {})", b.source)
    }
}

fn join(v: &[usize]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

/// Loads what `opts` names, builds the base, runs every prompt and returns the report.
/// The progress bar (if any) gets its length set and one tick per prompt.
pub fn verify(opts: &VerifyOptions, progress: Option<&ProgressBar>) -> Result<VerifyReport> {
    let mut load = opts.load.clone();
    let mut notices = Vec::new();
    for (flag, dir) in [("--against", &opts.against), ("--base", &opts.base)] {
        if dir.as_deref() == Some("") {
            return Err(Error::flag(flag, "is empty: expected a checkpoint folder or a Hugging Face hub id"));
        }
    }
    if load.skip_transparent {
        // Skipping the blocks under test would assume what verify sets out to prove.
        notices.push("--skip-transparent is ignored by verify: every block runs".into());
        load.skip_transparent = false;
    }
    let choice = crate::device::select(&load.device)?;
    notices.extend(choice.notice);
    let device = choice.device;
    let subject = load_subject(opts, &load, &device, &mut notices)?;
    let model = &subject.model;
    let max = model.config.max_position_embeddings;
    if opts.steps >= max {
        return Err(Error::flag("--steps", format!("{}: must leave room for a prompt within max_position_embeddings {max}", opts.steps)));
    }
    let mut inserted = subject.plan.inserted();
    if inserted.is_empty() {
        inserted = detect_inserted(model)?;
    }
    // --base and --against load in the model's dtype (and --quant), so tensors and kernels are comparable.
    let as_loaded = load.clone().expand("none").dtype(crate::config::dtype_hf_name(model.dtype));
    let (base, base_desc) = select_base(opts, &subject, &inserted, &as_loaded, &device)?;
    let (prompts, rendering) = build_prompts(opts, &subject, &mut notices)?;
    let against = load_against(opts, &subject, &inserted, &as_loaded, &device)?;

    let subject_name = if subject.plan.is_identity() {
        format!("{} ({} layers)", subject.name, model.blocks.len())
    } else {
        format!("expanded ({}, {} layers)", subject.plan.spec, model.blocks.len())
    };
    let mut subjects = vec![Subject { name: subject_name, model, inserted: inserted.clone() }];
    if let Some(a) = &against {
        subjects.push(Subject { name: format!("{} ({} layers)", a.dir, a.loaded.model.blocks.len()), model: &a.loaded.model, inserted: a.inserted.clone() });
    }
    if let Some(p) = progress {
        p.set_length(prompts.len() as u64);
    }
    let mut comparisons = compare(&base, &subjects, &prompts, opts.steps, progress)?.into_iter();
    let expanded = comparisons.next().ok_or_else(|| Error::flag("--model", "nothing was compared"))?;
    let against = match (against, comparisons.next()) {
        (Some(a), Some(comparison)) => Some(AgainstReport {
            path: a.dir,
            layers: a.loaded.model.blocks.len(),
            tensors_compared: a.tensors_compared,
            differing_tensors: a.differing_tensors,
            differing_layers: a.differing_layers,
            comparison,
        }),
        _ => None,
    };
    let verdict = verdict(&expanded, against.as_ref(), opts.tolerance);
    Ok(VerifyReport {
        model: subject.name.clone(),
        expand: subject.plan.spec.clone(),
        device: crate::device::name(&model.device),
        dtype: crate::config::dtype_hf_name(model.dtype).to_string(),
        quant: model.quant_type().map(|q| q.name().to_string()),
        layers: model.blocks.len(),
        inserted,
        base: base_desc,
        rendering,
        steps: opts.steps,
        tolerance: opts.tolerance,
        expanded,
        against,
        verdict,
        notices,
    })
}

/// The model under test: the checkpoint expanded by the plan, or random weights (`--synthetic`).
struct UnderTest {
    name: String,
    plan: crate::expand::Plan,
    model: Model,
    /// The checkpoint, when there is one (for its tokenizer and chat template).
    source: Option<Source>,
}

fn load_subject(opts: &VerifyOptions, load: &LoadOptions, device: &Device, notices: &mut Vec<String>) -> Result<UnderTest> {
    match &opts.synthetic {
        Some(spec) => {
            if opts.base.is_some() || opts.against.is_some() {
                let flag = if opts.base.is_some() { "--base" } else { "--against" };
                return Err(Error::flag(flag, "needs a checkpoint: it cannot be combined with --synthetic (random weights)"));
            }
            let (plan, model) = engine::load_synthetic(spec, load, device)?;
            notices.extend(engine::quant_notices(&model, load)?);
            Ok(UnderTest { name: format!("synthetic {spec}"), plan, model, source: None })
        }
        None => {
            let loaded = engine::load_from(Source::open(&load.model, load.revision.as_deref())?, load, device)?;
            notices.extend(loaded.notices);
            Ok(UnderTest { name: loaded.source.files.name.clone(), plan: loaded.plan, model: loaded.model, source: Some(loaded.source) })
        }
    }
}

/// The base to compare with: `--base DIR` loaded as it is, else the model without its inserted blocks
/// (sharing every tensor). Returns it with a description for the report.
fn select_base(opts: &VerifyOptions, subject: &UnderTest, inserted: &[usize], as_loaded: &LoadOptions, device: &Device) -> Result<(Model, String)> {
    let (model, name) = (&subject.model, &subject.name);
    let Some(dir) = &opts.base else {
        if inserted.is_empty() {
            return Err(Error::flag(
                "--expand",
                format!(
                    "`{}`: {name} has no inserted blocks to verify (no layer copies the one before it or has zero o_proj and down_proj); use --expand every:N or --base DIR",
                    subject.plan.spec
                ),
            ));
        }
        let keep: Vec<usize> = (0..model.blocks.len()).filter(|i| !inserted.contains(i)).collect();
        return Ok((model.with_blocks(&keep), format!("the same weights without layers {} (shared, no second load)", join(inserted))));
    };
    let b = engine::load_from(Source::open(dir, None)?, as_loaded, device)?;
    let kept = model.blocks.len() - inserted.len();
    if inserted.is_empty() || b.model.blocks.len() != kept {
        let found = if inserted.is_empty() { "none found".to_string() } else { format!("layers {}", join(inserted)) };
        return Err(Error::flag(
            "--base",
            format!(
                "{dir} has {} layers, but {name} has {} with {} inserted ({found}): expected {kept}",
                b.model.blocks.len(),
                model.blocks.len(),
                inserted.len()
            ),
        ));
    }
    if b.model.config.vocab_size != model.config.vocab_size {
        return Err(Error::flag("--base", format!("{dir} has vocab size {}, {name} has {}", b.model.config.vocab_size, model.config.vocab_size)));
    }
    Ok((b.model, format!("{dir} (loaded separately)")))
}

/// The prompts as token ids, and how they were rendered (for the report).
fn build_prompts(opts: &VerifyOptions, subject: &UnderTest, notices: &mut Vec<String>) -> Result<(Vec<Prompt>, String)> {
    let (source, model) = (subject.source.as_ref(), &subject.model);
    let tokenizer = match source {
        Some(s) if s.files.tokenizer.is_some() => Some(Tokenizer::for_model(s)?),
        _ => None,
    };
    let template = match (source, &tokenizer) {
        (Some(s), Some(t)) if !opts.raw => prompt_template(s, t)?,
        _ => None,
    };
    let rendering = match &template {
        Some(t) => match &t.origin {
            TemplateOrigin::Checkpoint(p) => format!("chat template ({})", p.file_name().map_or(p.display().to_string(), |n| n.to_string_lossy().into_owned())),
            other => format!("chat template ({other})"),
        },
        None => "raw".to_string(),
    };
    let renderer = tokenizer.as_ref().map(|tok| Renderer { tok, template: template.as_ref() });
    match &opts.prompts {
        Prompts::Ids(seqs) => {
            let p: Vec<Prompt> = seqs.iter().enumerate().map(|(i, ids)| Prompt { name: format!("ids #{}", i + 1), ids: ids.clone() }).collect();
            check_prompts(&p, model, opts.steps, "--ids")?;
            Ok((p, "token ids".into()))
        }
        Prompts::Texts(texts) => {
            let r = match (source, &renderer) {
                (None, _) => return Err(Error::flag("--prompt", "text prompts need a tokenizer and --synthetic has none: use --ids")),
                (Some(s), None) => return Err(Error::Tokenizer { path: s.files.dir.join("tokenizer.json"), msg: "not found (use --ids)".into() }),
                (Some(_), Some(r)) => r,
            };
            let p = text_prompts(r, texts)?;
            check_prompts(&p, model, opts.steps, "--prompt")?;
            Ok((p, rendering))
        }
        Prompts::Builtin => {
            let (p, rendering) = match &renderer {
                Some(r) => (builtin_text_prompts(r, model, opts.steps, notices)?, rendering),
                None => {
                    if source.is_some() {
                        notices.push(format!("{} has no tokenizer.json: using seeded random token ids as prompts", subject.name));
                    }
                    (random_prompts(model, opts.steps), "random token ids".into())
                }
            };
            // A built-in prompt can only be out of range through a tokenizer that does not fit the model.
            check_prompts(&p, model, opts.steps, "tokenizer.json")?;
            Ok((p, rendering))
        }
    }
}

/// `--prompt TEXT…`, named by their first characters.
fn text_prompts(r: &Renderer<'_>, texts: &[String]) -> Result<Vec<Prompt>> {
    let mut p = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let short: String = t.chars().take(24).collect();
        let name = if t.chars().count() > 24 { format!("#{} {short}…", i + 1) } else { format!("#{} {short}", i + 1) };
        p.push(Prompt { name: name.replace('\n', " "), ids: r.encode(t)? });
    }
    Ok(p)
}

/// `--against DIR` loaded as it is, with its tensor-by-tensor comparison.
struct Against {
    dir: String,
    loaded: engine::Loaded,
    inserted: Vec<usize>,
    tensors_compared: usize,
    differing_tensors: Vec<TensorDiff>,
    differing_layers: Vec<usize>,
}

fn load_against(opts: &VerifyOptions, subject: &UnderTest, inserted: &[usize], as_loaded: &LoadOptions, device: &Device) -> Result<Option<Against>> {
    let Some(dir) = &opts.against else { return Ok(None) };
    let model = &subject.model;
    let loaded = engine::load_from(Source::open(dir, None)?, as_loaded, device)?;
    let theirs = &loaded.model;
    if theirs.config.vocab_size != model.config.vocab_size {
        return Err(Error::flag("--against", format!("{dir} has vocab size {}, {} has {}", theirs.config.vocab_size, subject.name, model.config.vocab_size)));
    }
    let (tensors_compared, mut differing_tensors) = diff_tensors(model, theirs)?;
    let mut differing_layers: Vec<usize> = differing_tensors.iter().filter_map(|d| d.layer).collect();
    differing_layers.dedup();
    let inserted = if theirs.blocks.len() == model.blocks.len() {
        inserted.to_vec()
    } else {
        differing_tensors.push(TensorDiff {
            tensor: format!("(layer count: {} on disk, {} in memory)", theirs.blocks.len(), model.blocks.len()),
            layer: None,
            max_abs_diff: None,
        });
        detect_inserted(theirs)?
    };
    Ok(Some(Against { dir: dir.clone(), loaded, inserted, tensors_compared, differing_tensors, differing_layers }))
}

/// Reads `--prompts FILE`: one prompt per non-empty line.
pub fn read_prompts_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<String> = text.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).map(String::from).collect();
    if lines.is_empty() {
        return Err(Error::bad_file(path, "no prompts (expected one prompt per non-empty line)"));
    }
    Ok(lines)
}

fn num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.3e}")
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn write_comparison(f: &mut fmt::Formatter<'_>, c: &Comparison) -> fmt::Result {
    writeln!(f, "{} vs base", c.name)?;
    writeln!(f, "| prompt | tokens | steps | max abs Δlogit | KL mean | KL max | top-1 | first diff | bit-exact |")?;
    writeln!(f, "|--------|-------:|------:|---------------:|--------:|-------:|------:|-----------:|-----------|")?;
    let opt = |o: Option<usize>| o.map_or("-".to_string(), |x| x.to_string());
    for p in &c.prompts {
        let s = &p.stats;
        writeln!(
            f,
            "| {} | {} | {} | {} | {} | {} | {:.1}% | {} | {} |",
            p.name,
            p.prompt_tokens,
            p.steps,
            num(s.max_abs_diff as f64),
            num(s.kl_mean),
            num(s.kl_max),
            100.0 * s.top1_agreement,
            opt(p.first_divergence),
            yes(s.bit_exact)
        )?;
    }
    let s = &c.overall;
    writeln!(
        f,
        "| all ({} positions) | | | {} | {} | {} | {:.1}% | | {} |",
        s.positions,
        num(s.max_abs_diff as f64),
        num(s.kl_mean),
        num(s.kl_max),
        100.0 * s.top1_agreement,
        yes(s.bit_exact)
    )?;
    writeln!(f)?;
    writeln!(f, "| inserted layer | weights from layer | max ‖out−in‖/‖in‖ | mean | output == input |")?;
    writeln!(f, "|---------------:|-------------------:|------------------:|-----:|-----------------|")?;
    for b in &c.blocks {
        writeln!(f, "| {} | {} | {} | {} | {} |", b.layer, b.source, num(b.relative_delta), num(b.relative_delta_mean), yes(b.identical))?;
    }
    Ok(())
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "model:   {} · {} · {} layers (inserted: {}) · {} · {}",
            self.model,
            self.expand,
            self.layers,
            join(&self.inserted),
            self.device,
            self.quant.as_ref().map_or(self.dtype.clone(), |q| format!("{} + {q}", self.dtype))
        )?;
        writeln!(f, "base:    {}", self.base)?;
        writeln!(f, "prompts: {} · {} greedy step(s) chosen by the base · tolerance {}", self.rendering, self.steps, self.tolerance)?;
        writeln!(f)?;
        write_comparison(f, &self.expanded)?;
        if let Some(a) = &self.against {
            writeln!(f)?;
            if a.differing_tensors.is_empty() {
                writeln!(f, "{}: all {} tensors equal the in-memory expansion (−0.0 == 0.0)", a.path, a.tensors_compared)?;
            } else {
                writeln!(f, "{}: {} of {} tensors differ from the in-memory expansion:", a.path, a.differing_tensors.len(), a.tensors_compared)?;
                for d in &a.differing_tensors {
                    let m = d.max_abs_diff.map_or("shape differs".to_string(), |x| format!("max abs Δ {}", num(x as f64)));
                    writeln!(f, "  {} ({m})", d.tensor)?;
                }
            }
            writeln!(f)?;
            write_comparison(f, &a.comparison)?;
        }
        writeln!(f)?;
        write!(f, "{}", self.verdict.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The base's greedy token: the first maximum; a NaN anywhere (where candle's argmax would still
    /// name a token) is an error.
    #[test]
    fn argmax_last_takes_the_first_maximum_and_refuses_nan() {
        let row = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        assert_eq!(argmax_last(&row(&[1.0, 5.0, 3.0, 5.0])).unwrap(), 1);
        for at in [0, 2, 3] {
            let mut v = vec![1.0, 5.0, 3.0, 2.0];
            v[at] = f32::NAN;
            assert!(argmax_last(&row(&v)).unwrap_err().to_string().contains("NaN"), "NaN at {at}");
        }
    }
}
