//! The expansion plan as plain data: which source layer each output layer copies and how its tensors
//! are scaled. Built from `every:N` or a mergekit passthrough YAML; printable and testable without tensors.

use std::fmt;
use std::path::Path;

use candle_core::DType;
use serde_yaml::Value;

use crate::config::{parse_dtype, Config};
use crate::error::{Error, Result};
use crate::quant::QuantType;

/// One mergekit `scale` entry: `filter` is a plain substring of the source tensor name, `None` matches all.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScaleRule {
    pub filter: Option<String>,
    pub value: f64,
}

/// The scale mergekit applies to `tensor`: the first matching rule wins; no match leaves it unscaled.
pub fn scale_for(rules: &[ScaleRule], tensor: &str) -> f64 {
    rules.iter().find(|r| r.filter.as_deref().is_none_or(|f| tensor.contains(f))).map_or(1.0, |r| r.value)
}

/// Output layer ← source layer, with the scale rules that apply to its tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerPlan {
    pub source: usize,
    pub scale: Vec<ScaleRule>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Plan {
    /// How the plan was written: `none`, `every:4`, or the YAML path.
    #[serde(skip)]
    pub spec: String,
    pub source_layers: usize,
    pub layers: Vec<LayerPlan>,
    /// Rules for `model.embed_tokens` (mergekit takes them from the first slice).
    pub embed_scale: Vec<ScaleRule>,
    /// Rules for `model.norm` and `lm_head` (mergekit takes them from the last slice).
    pub head_scale: Vec<ScaleRule>,
    /// The YAML's output `dtype`, if it set one.
    #[serde(skip)]
    pub dtype: Option<DType>,
    /// Things the user should hear about but that do not stop the plan.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// The per-layer weight names, relative to `model.layers.{i}.`, in checkpoint order.
pub const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// The projections as the model stacks them (q/k/v, gate/up) or holds them alone (o, down): the loader
/// builds one weight per distinct (source layer, scales) of each.
pub const PROJECTIONS: [&[&str]; 4] = [
    &["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    &["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    &["self_attn.o_proj.weight"],
    &["mlp.down_proj.weight"],
];

pub fn layer_tensor_name(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

/// Shape of a per-layer weight, `[out, in]` for projections.
pub fn layer_tensor_shape(cfg: &Config, suffix: &str) -> Vec<usize> {
    let (h, d, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    match suffix {
        "self_attn.q_proj.weight" => vec![cfg.num_attention_heads * d, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![cfg.num_key_value_heads * d, h],
        "self_attn.o_proj.weight" => vec![h, cfg.num_attention_heads * d],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
        "mlp.down_proj.weight" => vec![h, i],
        _ => vec![h],
    }
}

impl Plan {
    /// The identity plan: every source layer once, nothing scaled.
    pub fn none(source_layers: usize) -> Plan {
        Plan {
            spec: "none".into(),
            source_layers,
            layers: (0..source_layers).map(|source| LayerPlan { source, scale: vec![] }).collect(),
            embed_scale: vec![],
            head_scale: vec![],
            dtype: None,
            warnings: vec![],
        }
    }

    /// LLaMA Pro: after every `n`-th source layer, a copy of it with o_proj and down_proj zeroed.
    pub fn every(n: usize, source_layers: usize) -> Result<Plan> {
        let spec = format!("every:{n}");
        if n == 0 {
            return Err(Error::ExpandSpec { spec, msg: "N must be at least 1".into() });
        }
        if n > source_layers {
            return Err(Error::ExpandSpec { spec, msg: format!("N is larger than the model's {source_layers} layers") });
        }
        let mut layers = Vec::new();
        for source in 0..source_layers {
            layers.push(LayerPlan { source, scale: vec![] });
            if (source + 1) % n == 0 {
                layers.push(LayerPlan { source, scale: zero_projection_rules() });
            }
        }
        Ok(Plan { spec, source_layers, layers, embed_scale: vec![], head_scale: vec![], dtype: None, warnings: vec![] })
    }

    /// Parses `--expand`: `none`, `every:N`, or a path to a mergekit YAML.
    pub fn from_spec(spec: &str, source_layers: usize, model: &str) -> Result<Plan> {
        if spec == "none" {
            return Ok(Plan::none(source_layers));
        }
        if let Some(n) = spec.strip_prefix("every:") {
            let n: usize = n.parse().map_err(|_| Error::ExpandSpec { spec: spec.into(), msg: "expected every:N with N a positive integer".into() })?;
            return Plan::every(n, source_layers);
        }
        let path = Path::new(spec);
        if path.extension().is_some_and(|e| e == "yml" || e == "yaml") || path.exists() {
            return Plan::from_mergekit_file(path, source_layers, model);
        }
        Err(Error::ExpandSpec { spec: spec.into(), msg: "expected `none`, `every:N` or a mergekit YAML file".into() })
    }

    pub fn from_mergekit_file(path: &Path, source_layers: usize, model: &str) -> Result<Plan> {
        let text = crate::config::read_text(path)?;
        let mut plan = Plan::from_mergekit_yaml(&text, path, source_layers, model)?;
        plan.spec = path.display().to_string();
        Ok(plan)
    }

    /// A mergekit 0.1.x passthrough config. `model` is what `--model` named: the YAML's `model:`
    /// may have been written on another machine, so a mismatch only warns.
    pub fn from_mergekit_yaml(text: &str, path: &Path, source_layers: usize, model: &str) -> Result<Plan> {
        let err = |key: &str, msg: String| Error::MergeConfig { path: path.into(), key: key.into(), msg };
        check_yaml_shape(text).map_err(|msg| Error::bad_file(path, msg))?;
        let doc: Value = serde_yaml::from_str(text).map_err(|e| Error::bad_file(path, format!("invalid YAML: {e}")))?;
        let dtype = yaml_top_level(&doc, &err)?;
        let top_scale = scale_rules(doc.get("parameters"), "parameters.scale", &err)?;
        let slices = doc.get("slices").and_then(Value::as_sequence).filter(|s| !s.is_empty()).ok_or_else(|| err("slices", "missing or empty".into()))?;

        let mut layers = Vec::new();
        let mut models: Vec<String> = Vec::new();
        let mut slice_rules = Vec::new();
        for (i, slice) in slices.iter().enumerate() {
            let s = yaml_slice(i, slice, source_layers, &top_scale, &err)?;
            if !models.contains(&s.model) {
                models.push(s.model);
            }
            layers.extend(s.layers.map(|source| LayerPlan { source, scale: s.rules.clone() }));
            slice_rules.push(s.rules);
        }
        if models.len() > 1 {
            return Err(err("slices[].sources[].model", format!("several models ({}); expanse expands one", models.join(", "))));
        }
        let mut warnings = Vec::new();
        if models[0] != model && !same_model(&models[0], model) {
            warnings.push(format!("{}: the YAML names model `{}`; using --model `{model}` instead", path.display(), models[0]));
        }
        Ok(Plan {
            spec: path.display().to_string(),
            source_layers,
            layers,
            embed_scale: slice_rules.first().cloned().unwrap_or_default(),
            head_scale: slice_rules.last().cloned().unwrap_or_default(),
            dtype,
            warnings,
        })
    }

    pub fn is_identity(&self) -> bool {
        self.layers.len() == self.source_layers
            && self.layers.iter().enumerate().all(|(i, l)| l.source == i && l.scale.iter().all(|r| r.value == 1.0))
            && self.embed_scale.iter().chain(&self.head_scale).all(|r| r.value == 1.0)
    }

    /// The scale of per-layer tensor `suffix` in output layer `out`, looked up on its source name.
    pub fn layer_scale(&self, out: usize, suffix: &str) -> f64 {
        let l = &self.layers[out];
        scale_for(&l.scale, &layer_tensor_name(l.source, suffix))
    }

    /// Output layers whose source appeared before them: the inserted copies.
    pub fn inserted(&self) -> Vec<usize> {
        let mut seen = vec![false; self.source_layers];
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if seen[l.source] {
                out.push(i);
            }
            seen[l.source] = true;
        }
        out
    }

    /// Sizes of the expanded model: what expanse allocates vs what a merged copy takes on disk.
    pub fn totals(&self, cfg: &Config, dtype: DType) -> PlanTotals {
        self.totals_as(cfg, dtype, None)
    }

    /// [`Plan::totals`] with the projections and lm_head held quantized to `quant` (as `--quant`
    /// loads them; embeddings and norms stay in `dtype`, a merged copy on disk stays dense). Counted
    /// as the loader holds them: one stacked projection per distinct (source layer, scales) — copies
    /// share it, and scaling one part makes the whole stack new — and a norm per source unless scaled.
    pub fn totals_as(&self, cfg: &Config, dtype: DType, quant: Option<QuantType>) -> PlanTotals {
        let el = dtype.size_in_bytes();
        let h = cfg.hidden_size;
        // A stacked projection's bytes: its quantized type where its width allows one, else dense.
        let held = |rows: usize, cols: usize| match quant.and_then(|q| q.for_width(cols)) {
            Some(q) => q.bytes_for(rows, cols),
            None => rows * cols * el,
        };
        let (mut allocated, mut new_bytes) = (0usize, 0usize);
        let mut projections = std::collections::HashSet::new();
        let mut norms = std::collections::HashSet::new();
        for (out, l) in self.layers.iter().enumerate() {
            for parts in PROJECTIONS {
                let scales: Vec<u64> = parts.iter().map(|s| self.layer_scale(out, s).to_bits()).collect();
                let scaled = scales.iter().any(|&v| f64::from_bits(v) != 1.0);
                if projections.insert((l.source, parts[0], scales)) {
                    let shapes: Vec<Vec<usize>> = parts.iter().map(|s| layer_tensor_shape(cfg, s)).collect();
                    let bytes = held(shapes.iter().map(|s| s[0]).sum(), shapes[0][1]);
                    allocated += bytes;
                    new_bytes += if scaled { bytes } else { 0 };
                }
            }
            for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
                if self.layer_scale(out, norm) != 1.0 {
                    (allocated, new_bytes) = (allocated + h * el, new_bytes + h * el);
                } else if norms.insert((l.source, norm)) {
                    allocated += h * el;
                }
            }
        }
        let head_type = quant.and_then(|q| q.for_width(h));
        // A tied lm_head is the embedding itself unless it is quantized (then a matrix of its own).
        let head_bytes = match head_type {
            Some(q) => q.bytes_for(cfg.vocab_size, h),
            None if cfg.tie_word_embeddings => 0,
            None => cfg.vocab_size * h * el,
        };
        allocated += cfg.vocab_size * h * el + head_bytes + h * el;
        let expanded_params = cfg.params_with_layers(self.layers.len());
        PlanTotals {
            source_layers: self.source_layers,
            layers: self.layers.len(),
            inserted: self.inserted().len(),
            base_params: cfg.params_with_layers(cfg.num_hidden_layers),
            expanded_params,
            allocated_bytes: allocated,
            new_bytes,
            merged_bytes: expanded_params * el,
        }
    }

    /// A printable view of the plan with its totals for `cfg` in `dtype` (projections in `quant`).
    pub fn table<'a>(&'a self, cfg: &'a Config, dtype: DType, quant: Option<QuantType>) -> PlanTable<'a> {
        PlanTable { plan: self, cfg, dtype, quant }
    }
}

fn zero_projection_rules() -> Vec<ScaleRule> {
    vec![
        ScaleRule { filter: Some("o_proj".into()), value: 0.0 },
        ScaleRule { filter: Some("down_proj".into()), value: 0.0 },
        ScaleRule { filter: None, value: 1.0 },
    ]
}

/// `openchat/openchat-3.5-0106` and a local `.../openchat-3.5-0106` name the same model.
fn same_model(yaml: &str, model: &str) -> bool {
    let last = |s: &str| s.trim_end_matches('/').rsplit('/').next().unwrap_or("").to_string();
    last(yaml) == last(model)
}

/// Largest mergekit YAML read: real ones are a few kB (a 40-layer expansion: 2 kB).
const MAX_YAML_BYTES: usize = 1 << 20;
/// Deepest nesting read: mergekit's configs nest 6 levels. The YAML parser's time grows with the
/// square of the depth (80,000 levels: 25 s), so the depth is bounded before it runs.
const MAX_YAML_DEPTH: usize = 64;

/// Refuses, before parsing, a YAML larger or more deeply nested than any mergekit config.
fn check_yaml_shape(text: &str) -> std::result::Result<(), String> {
    if text.len() > MAX_YAML_BYTES {
        return Err(format!("{} bytes: larger than any mergekit config (at most {} MiB)", text.len(), MAX_YAML_BYTES >> 20));
    }
    match yaml_depth_past(text, MAX_YAML_DEPTH) {
        Some(line) => Err(format!("nested deeper than {MAX_YAML_DEPTH} levels (line {line}): deeper than any mergekit config")),
        None => Ok(()),
    }
}

/// The first line (1-based) where `text` nests deeper than `max`, counting block levels (indentation
/// and `- `/`? ` indicators) and flow levels (`[`, `{`) together; None if it never does. A cheap
/// scan, not a parser: brackets inside quotes, comments and block scalars are text, and a quote
/// opens a scalar only where one can start.
fn yaml_depth_past(text: &str, max: usize) -> Option<usize> {
    let mut scan = DepthScan::default();
    for (i, line) in text.lines().enumerate() {
        if scan.line(line) > max {
            return Some(i + 1);
        }
    }
    None
}

/// The state of `yaml_depth_past` between lines.
#[derive(Default)]
struct DepthScan {
    /// Columns of the open block levels.
    blocks: Vec<usize>,
    flow: usize,
    /// Inside a quoted scalar (it may span lines): its quote character.
    quote: Option<char>,
    /// Inside a block scalar (`|`, `>`): the indentation of the line that opened it.
    literal: Option<usize>,
}

impl DepthScan {
    /// Scans one line; returns the deepest nesting reached in it.
    fn line(&mut self, line: &str) -> usize {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = &line[indent..];
        if let Some(opened) = self.literal {
            if content.is_empty() || indent > opened {
                return 0;
            }
            self.literal = None;
        }
        if self.quote.is_none() && self.flow == 0 && !content.is_empty() && !content.starts_with('#') {
            self.block_levels(indent, content);
        }
        let deepest = self.flow_levels(content);
        if self.quote.is_none() && self.flow == 0 && opens_block_scalar(content) {
            self.literal = Some(indent);
        }
        deepest
    }

    /// Opens the block levels of a line starting at column `indent`: its own, and one per `- ` or
    /// `? ` indicator that starts it (`- - x` nests two sequences).
    fn block_levels(&mut self, indent: usize, content: &str) {
        while self.blocks.last().is_some_and(|&c| c >= indent) {
            self.blocks.pop();
        }
        self.blocks.push(indent);
        let mut column = indent;
        let mut rest = content;
        while let Some(after) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
            let skipped = after.len() - after.trim_start_matches(' ').len();
            column += 2 + skipped;
            rest = &after[skipped..];
            self.blocks.push(column);
        }
    }

    /// Follows quotes and flow brackets through `content`; the deepest nesting reached.
    fn flow_levels(&mut self, content: &str) -> usize {
        let mut deepest = self.blocks.len() + self.flow;
        let mut prev = ' ';
        let mut chars = content.chars().peekable();
        while let Some(c) = chars.next() {
            match (self.quote, c) {
                (Some('"'), '\\') => {
                    chars.next();
                }
                (Some('\''), '\'') if chars.peek() == Some(&'\'') => {
                    chars.next();
                }
                (Some(q), c) if c == q => self.quote = None,
                (Some(_), _) => {}
                (None, '#') if prev == ' ' || prev == '\t' => break,
                (None, '\'' | '"') if " \t[{,:".contains(prev) => self.quote = Some(c),
                (None, '[' | '{') => {
                    self.flow += 1;
                    deepest = deepest.max(self.blocks.len() + self.flow);
                }
                (None, ']' | '}') => self.flow = self.flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
        deepest
    }
}

/// Whether a line (outside quotes and flows) ends by opening a block scalar: `key: |`, `- >-`.
fn opens_block_scalar(content: &str) -> bool {
    let code = content.split(" #").next().unwrap_or("").trim_end();
    let Some(at) = code.rfind(['|', '>']) else { return false };
    let indicator_rest = &code[at + 1..];
    let before = &code[..at];
    indicator_rest.chars().all(|c| c == '-' || c == '+' || c.is_ascii_digit()) && (before.ends_with(": ") || before.ends_with("- ") || before.is_empty())
}

/// Checks a mergekit YAML's top-level keys and merge method; returns its `out_dtype` (or `dtype`).
fn yaml_top_level(doc: &Value, err: &dyn Fn(&str, String) -> Error) -> Result<Option<DType>> {
    let top = doc.as_mapping().ok_or_else(|| err("(top level)", "expected a mapping".into()))?;
    for key in top.keys() {
        let k = key.as_str().unwrap_or("?");
        if k == "tokenizer_source" {
            // mergekit builds the output's vocabulary (and so its embeddings) from it; expanse keeps the model's.
            return Err(err(
                k,
                "not supported: mergekit would rebuild the vocabulary and embeddings from it, expanse keeps the model's own tokenizer (remove the key)".into(),
            ));
        }
        if !matches!(k, "slices" | "merge_method" | "dtype" | "out_dtype" | "parameters" | "base_model") {
            return Err(err(k, "not supported in a passthrough expansion".into()));
        }
    }
    match doc.get("merge_method").and_then(Value::as_str) {
        Some("passthrough") => {}
        Some(m) => return Err(err("merge_method", format!("`{m}` is not supported (passthrough only)"))),
        None => return Err(err("merge_method", "missing (expected passthrough)".into())),
    }
    match doc.get("out_dtype").or(doc.get("dtype")) {
        None => Ok(None),
        Some(v) => {
            let name = v.as_str().unwrap_or("");
            Ok(Some(parse_dtype(name).ok_or_else(|| err("dtype", format!("`{name}` is not a supported dtype")))?))
        }
    }
}

/// One passthrough slice of a mergekit YAML.
struct YamlSlice {
    model: String,
    layers: std::ops::Range<usize>,
    /// The scale rules its layers follow, in mergekit's lookup order.
    rules: Vec<ScaleRule>,
}

/// Slice `i`: its one source's model and layer range (checked against the model's `source_layers`),
/// and its scale rules.
fn yaml_slice(i: usize, slice: &Value, source_layers: usize, top_scale: &Option<Vec<ScaleRule>>, err: &dyn Fn(&str, String) -> Error) -> Result<YamlSlice> {
    let sources = slice.get("sources").and_then(Value::as_sequence).ok_or_else(|| err(&format!("slices[{i}].sources"), "missing".into()))?;
    if sources.len() != 1 {
        return Err(err(&format!("slices[{i}].sources"), format!("{} sources in one slice; passthrough takes exactly one", sources.len())));
    }
    let src = &sources[0];
    let key = |k: &str| format!("slices[{i}].sources[0].{k}");
    let model = src.get("model").and_then(Value::as_str).ok_or_else(|| err(&key("model"), "missing".into()))?;
    let range =
        src.get("layer_range").and_then(Value::as_sequence).filter(|r| r.len() == 2).ok_or_else(|| err(&key("layer_range"), "expected [start, end]".into()))?;
    let (start, end) = match (range[0].as_u64(), range[1].as_u64()) {
        (Some(s), Some(e)) => (s as usize, e as usize),
        _ => return Err(err(&key("layer_range"), "expected two non-negative integers".into())),
    };
    if start >= end {
        let why = if start == end { "is empty" } else { "is reversed" };
        return Err(err(&key("layer_range"), format!("[{start}, {end}] {why}: expected [start, end] with start < end")));
    }
    if end > source_layers {
        return Err(err(&key("layer_range"), format!("[{start}, {end}] is out of bounds for a model of {source_layers} layers")));
    }
    // mergekit looks a parameter up at the source, then the slice, then the top level, and the
    // first level whose list has a matching filter wins (a level without a match falls through).
    // First match over the concatenated lists is exactly that.
    let source_scale = scale_rules(src.get("parameters"), &key("parameters.scale"), err)?;
    let own_scale = scale_rules(slice.get("parameters"), &format!("slices[{i}].parameters.scale"), err)?;
    let rules = [source_scale, own_scale, top_scale.clone()].into_iter().flatten().flatten().collect();
    Ok(YamlSlice { model: model.to_string(), layers: start..end, rules })
}

/// Reads `parameters.scale` under `params`: a number or a list of `{filter?, value}`.
fn scale_rules(params: Option<&Value>, key: &str, err: &dyn Fn(&str, String) -> Error) -> Result<Option<Vec<ScaleRule>>> {
    let Some(params) = params else { return Ok(None) };
    let map = params.as_mapping().ok_or_else(|| err(key, "parameters must be a mapping".into()))?;
    for k in map.keys() {
        let k = k.as_str().unwrap_or("?");
        if k != "scale" {
            return Err(err(&key.replace("scale", k), "not a passthrough parameter (only `scale`)".into()));
        }
    }
    let Some(scale) = params.get("scale") else { return Ok(None) };
    let number = |v: &Value, key: &str| -> Result<f64> {
        match v {
            Value::Number(n) => match n.as_f64() {
                Some(x) if x.is_finite() => Ok(x),
                // A NaN or infinite scale turns the scaled tensors (and so every logit) into NaN.
                Some(x) => Err(err(key, format!("{x} is not a finite number"))),
                None => Err(err(key, "not a number".into())),
            },
            Value::Sequence(_) => Err(err(key, "gradient (list) values are not supported".into())),
            _ => Err(err(key, "expected a number".into())),
        }
    };
    match scale {
        Value::Number(_) => Ok(Some(vec![ScaleRule { filter: None, value: number(scale, key)? }])),
        Value::Sequence(entries) => {
            let mut rules = Vec::new();
            for (j, e) in entries.iter().enumerate() {
                let ek = format!("{key}[{j}]");
                if e.is_number() {
                    return Err(err(key, "gradient (list) values are not supported".into()));
                }
                let value = e.get("value").ok_or_else(|| err(&ek, "missing `value`".into()))?;
                let filter = match e.get("filter") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(err(&format!("{ek}.filter"), "expected a string".into())),
                };
                rules.push(ScaleRule { filter, value: number(value, &format!("{ek}.value"))? });
            }
            Ok(Some(rules))
        }
        _ => Err(err(key, "expected a number or a list of {filter, value}".into())),
    }
}

/// Sizes of an expansion, in parameters and bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanTotals {
    pub source_layers: usize,
    pub layers: usize,
    pub inserted: usize,
    pub base_params: usize,
    pub expanded_params: usize,
    /// Bytes expanse holds: the base weights once plus every scaled (new) tensor.
    pub allocated_bytes: usize,
    pub new_bytes: usize,
    /// Bytes a merged checkpoint of the expanded model takes on disk.
    pub merged_bytes: usize,
}

pub struct PlanTable<'a> {
    plan: &'a Plan,
    cfg: &'a Config,
    dtype: DType,
    quant: Option<QuantType>,
}

pub fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

pub fn human_params(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else {
        format!("{:.1}k", n / 1e3)
    }
}

fn short_name(suffix: &str) -> &str {
    suffix.trim_end_matches(".weight").rsplit('.').next().unwrap_or(suffix)
}

impl fmt::Display for PlanTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.plan;
        let inserted = p.inserted();
        writeln!(f, "expansion {}: {} → {} layers", p.spec, p.source_layers, p.layers.len())?;
        writeln!(f, "| out | src | kind   | scaled tensors |")?;
        writeln!(f, "|----:|----:|--------|----------------|")?;
        for (out, l) in p.layers.iter().enumerate() {
            let scaled: Vec<String> = LAYER_TENSORS
                .iter()
                .filter_map(|s| {
                    let v = p.layer_scale(out, s);
                    (v != 1.0).then(|| format!("{}×{v}", short_name(s)))
                })
                .collect();
            let kind = if inserted.contains(&out) { "copy" } else { "source" };
            let scaled = if scaled.is_empty() { "-".to_string() } else { scaled.join(", ") };
            writeln!(f, "| {out:>3} | {:>3} | {kind:<6} | {scaled} |", l.source)?;
        }
        for (what, rules) in [("embed_tokens", &p.embed_scale), ("norm, lm_head", &p.head_scale)] {
            let scaled: Vec<String> = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
                .iter()
                .filter(|n| what.contains(short_name(n)))
                .filter_map(|n| {
                    let v = scale_for(rules, n);
                    (v != 1.0).then(|| format!("{}×{v}", short_name(n)))
                })
                .collect();
            if !scaled.is_empty() {
                writeln!(f, "{what}: {}", scaled.join(", "))?;
            }
        }
        let t = p.totals_as(self.cfg, self.dtype, self.quant);
        writeln!(f, "layers: {} ({} source + {} inserted copies)", t.layers, t.layers - t.inserted, t.inserted)?;
        writeln!(f, "parameters: {} expanded, {} base", human_params(t.expanded_params), human_params(t.base_params))?;
        let held = match self.quant {
            Some(q) => format!("projections {}, the rest {}", q.name(), crate::config::dtype_hf_name(self.dtype)),
            None => crate::config::dtype_hf_name(self.dtype).to_string(),
        };
        write!(
            f,
            "bytes ({held}): {} allocated ({} new), {} as a merged checkpoint on disk",
            human_bytes(t.allocated_bytes),
            human_bytes(t.new_bytes),
            human_bytes(t.merged_bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_four_on_32_layers_is_llama_pro() {
        let p = Plan::every(4, 32).unwrap();
        assert_eq!(p.layers.len(), 40);
        assert_eq!(p.inserted(), vec![4, 9, 14, 19, 24, 29, 34, 39]);
        assert_eq!(p.layers[4].source, 3);
        assert_eq!(p.layer_scale(4, "self_attn.o_proj.weight"), 0.0);
        assert_eq!(p.layer_scale(4, "mlp.down_proj.weight"), 0.0);
        assert_eq!(p.layer_scale(4, "mlp.up_proj.weight"), 1.0);
        assert_eq!(p.layer_scale(3, "self_attn.o_proj.weight"), 1.0);
    }

    #[test]
    fn bad_specs_name_the_spec() {
        let e = Plan::from_spec("every:0", 32, "m").unwrap_err().to_string();
        assert!(e.contains("every:0"), "{e}");
        assert!(Plan::from_spec("every:x", 32, "m").is_err());
        assert!(Plan::from_spec("every:33", 32, "m").is_err());
        assert!(Plan::from_spec("sometimes", 32, "m").is_err());
    }

    #[test]
    fn first_matching_filter_wins() {
        let rules = vec![
            ScaleRule { filter: Some("o_proj".into()), value: 0.0 },
            ScaleRule { filter: Some("proj".into()), value: 0.5 },
            ScaleRule { filter: None, value: 2.0 },
        ];
        assert_eq!(scale_for(&rules, "model.layers.1.self_attn.o_proj.weight"), 0.0);
        assert_eq!(scale_for(&rules, "model.layers.1.self_attn.q_proj.weight"), 0.5);
        assert_eq!(scale_for(&rules, "model.layers.1.input_layernorm.weight"), 2.0);
        assert_eq!(scale_for(&rules[..1], "model.norm.weight"), 1.0);
    }

    const YAML: &str = "slices:\n  - sources:\n    - model: org/m\n      layer_range: [0, 4]\nmerge_method: passthrough\ndtype: bfloat16\n";

    fn yaml_err(text: &str) -> String {
        Plan::from_mergekit_yaml(text, Path::new("x.yml"), 4, "org/m").unwrap_err().to_string()
    }

    #[test]
    fn yaml_refusals_name_the_key() {
        assert!(Plan::from_mergekit_yaml(YAML, Path::new("x.yml"), 4, "org/m").is_ok());
        let two_sources = YAML.replace("      layer_range: [0, 4]\n", "      layer_range: [0, 4]\n    - model: org/m\n      layer_range: [0, 4]\n");
        assert!(yaml_err(&two_sources).contains("slices[0].sources"));
        let two_models =
            format!("{}  - sources:\n    - model: org/other\n      layer_range: [0, 1]\n", YAML.replace("merge_method: passthrough\ndtype: bfloat16\n", ""))
                + "merge_method: passthrough\n";
        assert!(yaml_err(&two_models).contains("several models"), "{}", yaml_err(&two_models));
        let gradient = YAML.replace("merge_method", "parameters:\n  scale: [0.0, 1.0]\nmerge_method");
        assert!(yaml_err(&gradient).contains("gradient"));
        let slerp = YAML.replace("passthrough", "slerp");
        assert!(yaml_err(&slerp).contains("merge_method"));
        let range = YAML.replace("[0, 4]", "[2, 9]");
        assert!(yaml_err(&range).contains("layer_range"));
        let other_param = YAML.replace("merge_method", "parameters:\n  weight: 0.5\nmerge_method");
        assert!(yaml_err(&other_param).contains("weight"));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let flow = format!("slices: {}{}\nmerge_method: passthrough\n", "[".repeat(10_000), "]".repeat(10_000));
        let block = format!("slices:\n{}x\nmerge_method: passthrough\n", "- ".repeat(100));
        let mapping: String = (0..100).map(|i| format!("{}k{i}:\n", "  ".repeat(i))).collect();
        for text in [flow, block, format!("slices:\n{mapping}")] {
            let e = yaml_err(&text);
            assert!(e.contains("x.yml") && e.contains("nested deeper than 64"), "{e}");
        }
        // Brackets in quotes and comments are text, not nesting.
        let quoted = YAML.replace("dtype: bfloat16", &format!("dtype: bfloat16\n# {}\n", "[".repeat(100)));
        assert!(Plan::from_mergekit_yaml(&quoted, Path::new("x.yml"), 4, "org/m").is_ok());
        let named = YAML.replace("org/m", &format!("'{}'\n      # \"{}", "{".repeat(100), "[".repeat(100)));
        assert!(Plan::from_mergekit_yaml(&named, Path::new("x.yml"), 4, "org/m").is_ok());
    }

    #[test]
    fn yaml_model_mismatch_only_warns() {
        let p = Plan::from_mergekit_yaml(YAML, Path::new("x.yml"), 4, "/models/elsewhere").unwrap();
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].contains("org/m"));
        let same = Plan::from_mergekit_yaml(YAML, Path::new("x.yml"), 4, "/cache/m").unwrap();
        assert!(same.warnings.is_empty());
    }
}
