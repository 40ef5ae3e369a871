//! The self-check of the fused decode step. The first time a process uses the fast path on a device,
//! the prompt also runs through the reference forward pass: the last prompt position and two decoded
//! tokens, each run as a decode step by both paths, must agree. On disagreement the step runs op by op on the
//! reference's own intermediate values, so the warning can name the first layer and op that differ.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Tensor};

use super::plan::{Buf, Kind, Op, OpName};
use super::{DecodeStep, StepOut};
use crate::compare::{self, max_or_nan, Diff, NonFinite, Top1};
use crate::engine::ids_tensor;
use crate::error::Result;
use crate::model::{Cache, Logits, Model, OpTrace};

/// How close the step must come to the reference.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Tolerance {
    /// Top-1 must agree wherever the reference's top-2 margin exceeds this many bf16 ulps of its top
    /// logit (random weights make near-ties, which any rounding may break either way).
    pub margin_ulps: f32,
    /// max |Δlogit| ≤ this × max |reference logit|.
    pub rel: f32,
    /// Per op of the diagnosis: max |Δ| ≤ this × max |reference value|.
    pub op_rel: f32,
}

impl Tolerance {
    /// For a model dtype. The half-dtype figures come from OpenChat's real shapes (random weights,
    /// bf16, CPU, attention split as on a GPU: `step::measure_openchat_shapes` in tests/it, figures in
    /// BENCHMARKS.md): logits differed by at most 2.4 % of the largest logit over 17 tokens, the
    /// attention op (the one op whose rounding differs) by 0.8 % of its largest value, top-1 never; the
    /// limits are about 3–4 times that. In f32 only summation orders differ.
    /// For a model: its dtype's, or for quantized weights the half-dtype figures (the reference
    /// rounds the activations to 8-bit blocks, as llama.cpp does; the fused kernels multiply them as
    /// they are, so even an f32 model differs by more than summation orders).
    pub fn for_model(model: &Model) -> Tolerance {
        match model.quant_type() {
            Some(_) => Tolerance::for_dtype(DType::BF16),
            None => Tolerance::for_dtype(model.dtype),
        }
    }

    pub fn for_dtype(dtype: DType) -> Tolerance {
        match dtype {
            DType::F32 => Tolerance { margin_ulps: 4.0, rel: 1e-3, op_rel: 1e-4 },
            _ => Tolerance { margin_ulps: 4.0, rel: 0.08, op_rel: 0.03 },
        }
    }
}

/// One compared position.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenCheck {
    /// Position in the sequence.
    pub pos: usize,
    /// max |Δlogit| / max |reference logit| (NaN when a logit is not finite).
    pub rel_diff: f32,
    /// The first non-finite logit of either side, if any: a failure whatever the tolerance.
    pub non_finite: Option<NonFinite>,
    /// None when the step's logits are not all finite.
    pub top1_step: Option<u32>,
    /// The step's own argmax op (taken on the device): must be the top-1 of its logits.
    pub argmax_step: u32,
    pub top1_reference: Option<u32>,
    /// The reference's top-2 margin, in bf16 ulps of its top logit.
    pub margin_ulps: f32,
}

/// The outcome of a self-check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub tokens: Vec<TokenCheck>,
    /// On failure: what differs first (`layer 7 o_proj: max |Δ| 3.1 (rel 0.8)`), or why no op could be named.
    pub finding: Option<String>,
}

impl Verdict {
    /// The one-line warning of a failed check.
    pub fn warning(&self) -> String {
        let worst = match self.tokens.iter().find_map(|t| t.non_finite.map(|n| (t.pos, n))) {
            Some((pos, n)) => format!("a non-finite logit ({} at id {}, {:?} side) at position {pos}", n.value, n.index, n.side),
            None => format!("worst logit difference {:.3} of the largest logit", max_or_nan(self.tokens.iter().map(|t| t.rel_diff))),
        };
        format!(
            "the fast decode path disagrees with the reference ({}; {worst}); continuing on the reference path",
            self.finding.as_deref().unwrap_or("no single op exceeds its tolerance"),
        )
    }
}

/// The process-wide key of a self-check: one per device, dtype, weight type, path and attention
/// splits, so a step that would decode through other kernels (the split count decides how the
/// attention divides and merges; a quantized type, which GEMVs) is checked again.
pub fn key(model: &Model, path: super::DecodePath, splits: usize) -> String {
    let weights = model.quant_type().map_or("dense", |q| q.name());
    format!("{:?}/{:?}/{weights}/{}/splits={splits}", model.device.location(), model.dtype, path.as_str())
}

/// Verdicts of this process, by device and path: the check runs once per device.
fn verdicts() -> &'static Mutex<HashMap<String, bool>> {
    static V: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    V.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether the step's device already passed (Some(true)) or failed (Some(false)) in this process.
pub fn known(key: &str) -> Option<bool> {
    verdicts().lock().ok()?.get(key).copied()
}

/// Drops the verdict of `key` (tests: a verdict another test left would skip the check).
#[cfg(test)]
pub fn forget(key: &str) {
    if let Ok(mut v) = verdicts().lock() {
        v.remove(key);
    }
}

pub fn remember(key: &str, pass: bool) {
    if let Ok(mut v) = verdicts().lock() {
        v.insert(key.to_string(), pass);
    }
}

fn logits_of(out: StepOut) -> Result<Tensor> {
    match out {
        StepOut::Logits(l) => Ok(l),
        StepOut::Token(_) => Err(crate::error::Error::internal("self-check: the step returned no logits")),
    }
}

fn f32_row(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// One position compared: relative difference, top-1 of both, and the reference's margin.
fn compare(pos: usize, step: &[f32], argmax_step: u32, reference: &[f32]) -> TokenCheck {
    let diff = Diff::new(step, reference);
    let top1 = Top1::new(step, reference);
    TokenCheck {
        pos,
        rel_diff: diff.rel(),
        non_finite: diff.non_finite,
        top1_step: top1.got.map(|i| i as u32),
        argmax_step,
        top1_reference: top1.want.map(|i| i as u32),
        margin_ulps: top1.margin_ulps,
    }
}

impl TokenCheck {
    /// Finite logits on both sides within `tol.rel`, the device's argmax the top-1 of its logits, and
    /// the reference's top-1 unless its margin is a near-tie. NaN fails every part.
    fn passes(&self, tol: &Tolerance) -> bool {
        let top1 = Top1 { got: self.top1_step.map(|i| i as usize), want: self.top1_reference.map(|i| i as usize), margin_ulps: self.margin_ulps };
        self.non_finite.is_none() && self.rel_diff <= tol.rel && self.top1_step == Some(self.argmax_step) && top1.agrees(tol.margin_ulps)
    }
}

/// Builds the step of `path` over a fresh cache of `capacity` tokens and checks it.
pub fn check_path(model: &Model, path: super::DecodePath, opts: &super::StepOptions, prompt: &[u32], capacity: usize) -> Result<Verdict> {
    let mut cache = Cache::new(model, capacity)?;
    let mut step = DecodeStep::new(model, &cache, path, opts)?;
    check_step(model, &mut step, &mut cache, opts, prompt)
}

/// Checks `step` (≥ 1 prompt token), the step that will decode: on `cache` when it has room for the
/// prompt and two tokens (the cache is left holding them: the caller resets it), so the check runs
/// the configuration users run (its attention splits and, on CUDA, the graph it captures and then
/// replays for every token). A prompt that fills the cache is checked on a step of its own with
/// the same split count on a scratch cache.
pub fn check_step(model: &Model, step: &mut DecodeStep, cache: &mut Cache, opts: &super::StepOptions, prompt: &[u32]) -> Result<Verdict> {
    let tol = Tolerance::for_model(model);
    if prompt.len() + 2 <= cache.capacity() {
        return run(model, step, cache, prompt, &tol);
    }
    let mut scratch = Cache::new(model, prompt.len() + 2)?;
    let same = super::StepOptions { splits: Some(step.plan().splits), ..opts.clone() };
    let mut probe = DecodeStep::new(model, &scratch, step.path(), &same)?;
    run(model, &mut probe, &mut scratch, prompt, &tol)
}

/// Runs `prompt` (≥ 1 token) through both paths and compares the last prompt position and two
/// decoded tokens. The step runs on `cache`.
pub fn run(model: &Model, step: &mut DecodeStep, cache: &mut Cache, prompt: &[u32], tol: &Tolerance) -> Result<Verdict> {
    let n = prompt.len();
    let dev = &model.device;
    // The reference runs the last prompt token as a decode step too (prefill of the rest, then one
    // token), so the comparison sees the step's own differences, not a whole-prompt prefill's.
    let mut ref_cache = Cache::new(model, n + 2)?;
    prefill_prefix(model, &mut ref_cache, prompt)?;
    let mut reference = vec![model.forward(&ids_tensor(&prompt[n - 1..], dev)?, &mut ref_cache, Logits::Last)?];
    let mut fed = Vec::new();
    for _ in 0..2 {
        let next = crate::kernels::cpu::argmax(&f32_row(&reference[reference.len() - 1])?);
        fed.push(next);
        reference.push(model.forward(&ids_tensor(&[next], dev)?, &mut ref_cache, Logits::Last)?);
    }
    prefill_prefix(model, cache, prompt)?;
    let mut tokens = Vec::new();
    for (i, &id) in std::iter::once(&prompt[n - 1]).chain(&fed).enumerate() {
        let got = f32_row(&logits_of(step.decode(cache, id, true)?)?)?;
        tokens.push(compare(n - 1 + i, &got, step.next_token()?, &f32_row(&reference[i])?));
    }
    let pass = tokens.iter().all(|t| t.passes(tol));
    let finding = if pass { None } else { diagnose(model, step, cache, prompt, tol)? };
    Ok(Verdict { pass, tokens, finding })
}

/// `cache` holding `prompt[..n-1]`, computed by the reference path.
fn prefill_prefix(model: &Model, cache: &mut Cache, prompt: &[u32]) -> Result<()> {
    cache.reset();
    if prompt.len() > 1 {
        model.forward(&ids_tensor(&prompt[..prompt.len() - 1], &model.device)?, cache, Logits::Last)?;
    }
    Ok(())
}

/// Runs the step op by op at the last prompt position, each op fed the reference's own inputs, and
/// returns the first op whose output differs beyond `tol.op_rel` (None when none does).
fn diagnose(model: &Model, step: &mut DecodeStep, cache: &mut Cache, prompt: &[u32], tol: &Tolerance) -> Result<Option<String>> {
    let mut first = None;
    op_by_op(model, step, cache, prompt, &mut |op, found| {
        // A NaN rel (a non-finite output) is over: `<=` on NaN is false.
        let within = found.rel <= tol.op_rel;
        let over = !within || found.argmax.is_some_and(|(got, want)| Some(got) != want);
        if over && first.is_none() {
            first = Some(found.describe(op));
        }
        first.is_none()
    })?;
    Ok(first)
}

/// How far one op's output is from the reference's, given the reference's inputs.
#[derive(Debug, Clone, Copy)]
pub struct OpDiff {
    pub max_abs: f32,
    /// max |Δ| / max |reference value|.
    pub rel: f32,
    /// For the argmax: (picked, the reference logits' first maximum; None when they hold a NaN).
    pub argmax: Option<(u32, Option<u32>)>,
}

impl OpDiff {
    fn describe(&self, op: &Op) -> String {
        match self.argmax {
            Some((got, Some(want))) if got != want => format!("{}: picked {got}, the largest logit is {want}", op.describe()),
            Some((got, None)) => format!("{}: picked {got} from reference logits that hold a NaN", op.describe()),
            _ if self.max_abs.is_nan() => format!("{}: a non-finite output ({:.3e} of the largest value)", op.describe(), self.rel),
            _ => format!("{}: max |Δ| {:.3e}, {:.3} of the largest value", op.describe(), self.max_abs, self.rel),
        }
    }
}

/// Runs the step op by op at the last prompt position, each op fed the reference's own intermediate
/// values, and tells `visit` how far each op's output is from the reference's (until it returns
/// false). Measurements of real shapes use it to choose the tolerances.
pub fn op_by_op(model: &Model, step: &mut DecodeStep, cache: &mut Cache, prompt: &[u32], visit: &mut dyn FnMut(&Op, OpDiff) -> bool) -> Result<()> {
    let (n, token) = (prompt.len(), prompt[prompt.len() - 1]);
    let mut ref_cache = Cache::new(model, n)?;
    prefill_prefix(model, &mut ref_cache, prompt)?;
    let mut trace = OpTrace::default();
    model.forward_op_traced(&ids_tensor(&[token], &model.device)?, &mut ref_cache, &mut trace)?;
    prefill_prefix(model, cache, prompt)?;
    let ops: Vec<Op> = step.plan().ops.clone();
    let blocks = step.plan().blocks.clone();
    for (i, op) in ops.iter().enumerate() {
        let prev = op.layer.map_or(blocks.last().copied(), |b| blocks.iter().take_while(|&&x| x != b).last().copied());
        let io = op_io(op, prev);
        for (buf, layer, name) in &io.inputs {
            let v = trace.get(*layer, name).ok_or_else(|| missing(layer, name))?;
            step.write_buf(*buf, v)?;
        }
        step.run_op(cache, i, token, n - 1)?;
        if let Some(diff) = op_diff(step, op, &io, &trace)? {
            if !visit(op, diff) {
                break;
            }
        }
    }
    Ok(())
}

fn missing(layer: &Option<usize>, name: &str) -> crate::error::Error {
    crate::error::Error::internal(format!("self-check: the reference trace has no {name} for layer {layer:?}"))
}

/// What one op reads from the reference trace, and what it is compared with.
struct OpIo {
    inputs: Vec<(Buf, Option<usize>, &'static str)>,
    expect: Option<(Buf, Option<usize>, &'static str)>,
}

/// The reference values an op starts from and should produce. `prev` is the block before the op's
/// (the last block for the final norm).
fn op_io(op: &Op, prev: Option<usize>) -> OpIo {
    let b = op.layer;
    let io = |inputs: Vec<(Buf, Option<usize>, &'static str)>, expect| OpIo { inputs, expect };
    let norm_inputs = |x: Option<usize>, embed: bool| if embed { vec![] } else { vec![(Buf::X, x, "x_mid"), (Buf::D, x, "down")] };
    let embed = matches!(op.kind, Kind::EmbedNorm { .. });
    match op.name {
        OpName::InputNorm => io(norm_inputs(prev, embed), Some((Buf::H, b, "h_in"))),
        OpName::QkvProj => io(vec![(Buf::H, b, "h_in")], Some((Buf::Qkv, b, "qkv"))),
        OpName::RopeKv => io(vec![(Buf::Qkv, b, "qkv")], Some((Buf::Qkv, b, "qkv_rot"))),
        OpName::Attention => io(vec![(Buf::Qkv, b, "qkv_rot")], None),
        OpName::AttentionCombine => io(vec![], Some((Buf::Y, b, "y"))),
        OpName::OProj => io(vec![(Buf::Y, b, "y")], Some((Buf::D, b, "o"))),
        OpName::PostNorm => io(vec![(Buf::X, b, "x_in"), (Buf::D, b, "o")], Some((Buf::H, b, "h_post"))),
        OpName::GateUp => io(vec![(Buf::H, b, "h_post")], Some((Buf::Act, b, "act"))),
        OpName::DownProj => io(vec![(Buf::Act, b, "act")], Some((Buf::D, b, "down"))),
        OpName::FinalNorm => io(norm_inputs(prev, embed), Some((Buf::H, None, "h_final"))),
        OpName::LmHead => io(vec![(Buf::H, None, "h_final")], Some((Buf::Logits, None, "logits"))),
        OpName::Argmax => io(vec![(Buf::Logits, None, "logits")], None),
    }
}

/// The op's output against the reference (None for an op with nothing to compare, such as a split
/// attention's first pass).
fn op_diff(step: &mut DecodeStep, op: &Op, io: &OpIo, trace: &OpTrace) -> Result<Option<OpDiff>> {
    // The attention op writes y (a split one merges its splits inside the op).
    let expect = match (op.name, step.plan().output(op)) {
        (OpName::Attention, Some(buf)) => Some((buf, op.layer, "y")),
        _ => io.expect,
    };
    if op.name == OpName::Argmax {
        let logits = trace.get(None, "logits").ok_or_else(|| missing(&None, "logits"))?;
        let want = compare::argmax(logits).map(|i| i as u32);
        let got = step.next_token()?;
        return Ok(Some(OpDiff { max_abs: 0.0, rel: 0.0, argmax: Some((got, want)) }));
    }
    let Some((buf, layer, name)) = expect else { return Ok(None) };
    let want = trace.get(layer, name).ok_or_else(|| missing(&layer, name))?;
    let d = Diff::new(&step.read_buf(buf)?, want);
    Ok(Some(OpDiff { max_abs: d.max_abs, rel: d.rel(), argmax: None }))
}
