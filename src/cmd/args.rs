//! The flag groups several commands share (which checkpoint, which device, how to decode, how to
//! prompt and sample), and their translation into the library's options.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use super::Failure;
use crate::constraint::Grammar;
use crate::conversation::ChatOptions;
use crate::engine::{LoadOptions, Source};
use crate::error::Error;
use crate::generation::DecodeOptions;
use crate::sampling::SamplingParams;
use crate::step::{DecodePath, Fault, StepOptions};

/// Which checkpoint: shared by every subcommand that reads one.
#[derive(Args, Clone)]
pub struct CheckpointArgs {
    /// Checkpoint folder or Hugging Face hub id
    #[arg(long, default_value = "openchat/openchat-3.5-0106")]
    pub model: String,
    /// Hub revision (branch, tag or commit)
    #[arg(long)]
    pub revision: Option<String>,
}

impl CheckpointArgs {
    /// Resolves --model (and --revision) to its files: cheap, so flags are checked before a load.
    pub fn open(&self) -> Result<Source, Error> {
        Source::open(&self.model, self.revision.as_deref())
    }
}

/// Which checkpoint and which expansion of it.
#[derive(Args, Clone)]
pub struct SourceArgs {
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
    /// Expansion: none, every:N (LLaMA Pro), or a mergekit passthrough YAML
    #[arg(long, default_value = "every:4")]
    pub expand: String,
}

/// Where and in which precision to run.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// auto, cpu, cuda[:N] or metal[:N]
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on GPU, the checkpoint's dtype on CPU), bf16, f16 or f32
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Quantize the projections and lm_head at load: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k or q6_k
    /// (llama-quantize --pure's bytes; embeddings and norms stay in --dtype)
    #[arg(long, value_name = "TYPE")]
    pub quant: Option<String>,
}

/// Flags every model-running subcommand shares (chat, generate, logits, verify, bench, serve).
#[derive(Args, Clone)]
pub struct ModelArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub run: DeviceArgs,
    /// CPU threads, 1 to 1024 (sets RAYON_NUM_THREADS before any work; default: all cores)
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// What `engine::load` needs, with `--skip-transparent` where the command has it.
    pub fn options(&self, skip_transparent: bool) -> LoadOptions {
        LoadOptions {
            model: self.source.checkpoint.model.clone(),
            revision: self.source.checkpoint.revision.clone(),
            expand: self.source.expand.clone(),
            device: self.run.device.clone(),
            dtype: self.run.dtype.clone(),
            quant: self.run.quant.clone(),
            skip_transparent,
        }
    }
}

/// How decode steps run, for the subcommands that generate.
#[derive(Args, Clone)]
pub struct DecodeArgs {
    /// Decode steps: auto (graph on CUDA, fused on the CPU, reference on Metal), graph, fused or
    /// reference (candle's composed ops); bench takes a comma-separated list
    #[arg(long, value_name = "PATH", default_value = "auto")]
    pub decode_path: String,
    /// Test hook: perturb the fused step's op OP (in layer LAYER): scaled by -4, or with `:nan` one
    /// element made NaN, to exercise the self-check
    #[arg(long, value_name = "[LAYER:]OP[:nan]", hide = true)]
    pub inject_fault: Option<String>,
}

impl DecodeArgs {
    /// `--decode-path` and `--inject-fault`, checked.
    pub fn options(&self) -> Result<DecodeOptions, Error> {
        let fault = self.inject_fault.as_deref().map(Fault::parse).transpose()?;
        let path = DecodePath::parse(&self.decode_path)?;
        if fault.is_some() && path == DecodePath::Reference {
            return Err(Error::flag("--inject-fault", "perturbs the fused step, which --decode-path reference does not run"));
        }
        // The default splits (None: sized for the device); the unit tests' build has one field more.
        Ok(DecodeOptions { path, step: StepOptions { fault, ..StepOptions::default() } })
    }
}

/// `--skip-transparent`, for the subcommands that may leave blocks out (not verify, which must run
/// every block it sets out to prove transparent).
#[derive(Args, Clone)]
pub struct SkipArgs {
    /// Skip blocks whose o_proj and down_proj were verified to be exactly zero at load time
    #[arg(long)]
    pub skip_transparent: bool,
}

/// Prompting and sampling flags shared by `chat`, `generate` and `serve`.
#[derive(Args, Clone)]
// Numeric flags take values that start with '-' (-1, -inf), so the flag's own check names what is wrong
// with them (clap would call the value an unknown argument).
pub struct PromptArgs {
    /// System message, rendered by the chat template
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template: a Jinja file, `openchat` (built in) or `none`; default: the checkpoint's
    #[arg(long, value_name = "FILE|openchat|none")]
    pub chat_template: Option<String>,
    /// Also stop at this text (repeatable); a special token's text stops at its id
    #[arg(long, value_name = "STRING")]
    pub stop: Vec<String>,
    /// Most tokens per answer (default: until a stop token or the context is full)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_tokens: Option<usize>,
    /// Context length in tokens (default and maximum: the model's max_position_embeddings)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub ctx: Option<usize>,
    /// 0 = greedy (default: generation_config.json, else 0.8)
    #[arg(long, allow_hyphen_values = true)]
    pub temperature: Option<f64>,
    /// Nucleus sampling; 1 disables (default: generation_config.json, else 0.95)
    #[arg(long, allow_hyphen_values = true)]
    pub top_p: Option<f64>,
    /// 0 disables (default: generation_config.json, else 40)
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Drop tokens below this fraction of the top token's probability; 0 disables (default 0.05)
    #[arg(long, allow_hyphen_values = true)]
    pub min_p: Option<f64>,
    /// Penalise the last --repeat-last-n tokens; 1 disables (default: generation_config.json, else 1)
    #[arg(long, allow_hyphen_values = true)]
    pub repeat_penalty: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_last_n: Option<usize>,
    /// Lower each token's logit by this × its count in the last --repeat-last-n tokens, -2 to 2 (default 0)
    #[arg(long, allow_hyphen_values = true)]
    pub frequency_penalty: Option<f64>,
    /// Lower the logit of each token present in the last --repeat-last-n tokens by this, -2 to 2 (default 0)
    #[arg(long, allow_hyphen_values = true)]
    pub presence_penalty: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Pause between decode steps (for terminal and server tests)
    #[arg(long, hide = true, default_value_t = 0)]
    pub decode_delay_ms: u64,
}

impl PromptArgs {
    /// The sampling flags over generation_config.json, and the rest checked against the model's config.
    pub fn options(&self, source: &Source, decode: &DecodeArgs) -> Result<ChatOptions, Failure> {
        let mut sampling = SamplingParams::from_generation_config(&source.generation);
        let flags: [(&str, Option<String>); 9] = [
            ("temperature", self.temperature.map(|v| v.to_string())),
            ("top_p", self.top_p.map(|v| v.to_string())),
            ("top_k", self.top_k.map(|v| v.to_string())),
            ("min_p", self.min_p.map(|v| v.to_string())),
            ("repeat_penalty", self.repeat_penalty.map(|v| v.to_string())),
            ("repeat_last_n", self.repeat_last_n.map(|v| v.to_string())),
            ("frequency_penalty", self.frequency_penalty.map(|v| v.to_string())),
            ("presence_penalty", self.presence_penalty.map(|v| v.to_string())),
            ("seed", self.seed.map(|v| v.to_string())),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                sampling.set(key, &v).map_err(|e| Error::flag(&format!("--{}", key.replace('_', "-")), e))?;
            }
        }
        let max_pos = source.config.max_position_embeddings;
        match self.ctx {
            Some(0) => return Err(Error::flag("--ctx", "must be at least 1").into()),
            Some(n) if n > max_pos => return Err(Error::flag("--ctx", format!("{n} exceeds the model's max_position_embeddings {max_pos}")).into()),
            _ => {}
        }
        if self.max_tokens == Some(0) {
            return Err(Error::flag("--max-tokens", "must be at least 1").into());
        }
        Ok(ChatOptions {
            system: self.system.clone(),
            template: self.chat_template.clone(),
            stops: self.stop.clone(),
            max_tokens: self.max_tokens,
            ctx: self.ctx,
            sampling,
            show_prompt: false,
            color: false,
            decode_delay: std::time::Duration::from_millis(self.decode_delay_ms),
            decode: decode.options()?,
            grammar: None,
        })
    }
}

/// The terminal's flags over the prompting ones: `chat` and `generate`.
#[derive(Args, Clone)]
pub struct GenArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Print the rendered prompt and its token ids (to stderr) before generating
    #[arg(long)]
    pub show_prompt: bool,
    /// No ANSI colours (NO_COLOR is honoured too)
    #[arg(long)]
    pub no_color: bool,
    /// Constrain every answer to JSON valid against this JSON schema (`{}`: any JSON value)
    #[arg(long, value_name = "SCHEMA", conflicts_with = "json_schema_file")]
    pub json_schema: Option<String>,
    /// --json-schema, read from a file
    #[arg(long, value_name = "FILE")]
    pub json_schema_file: Option<PathBuf>,
}

impl GenArgs {
    /// [`PromptArgs::options`] with the terminal's flags.
    pub fn options(&self, source: &Source, decode: &DecodeArgs) -> Result<ChatOptions, Failure> {
        let mut opts = self.prompt.options(source, decode)?;
        opts.show_prompt = self.show_prompt;
        opts.color = want_color(self.no_color);
        opts.grammar = self.grammar()?;
        Ok(opts)
    }

    /// `--json-schema` or `--json-schema-file` as a grammar: a JSON object (a schema) or `true`.
    fn grammar(&self) -> Result<Option<Grammar>, Failure> {
        let (text, flag) = match (&self.json_schema, &self.json_schema_file) {
            (Some(s), _) => (s.clone(), "--json-schema"),
            (None, Some(path)) => (std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?, "--json-schema-file"),
            (None, None) => return Ok(None),
        };
        let schema: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::flag(flag, format!("not JSON: {e}")))?;
        match schema {
            serde_json::Value::Object(_) => Ok(Some(Grammar::Json(schema))),
            serde_json::Value::Bool(true) => Ok(Some(Grammar::Json(serde_json::json!({})))),
            v => Err(Error::flag(flag, format!("expected a JSON schema (an object), got {v}")).into()),
        }
    }
}

/// Colour is on for a terminal unless `--no-color` or a non-empty `NO_COLOR` (no-color.org) says no.
pub fn want_color(no_color_flag: bool) -> bool {
    let env_off = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color_flag && !env_off && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// `--tolerance` of verify and compare-logits: NaN would pass every comparison, a negative value none.
pub fn check_tolerance(tolerance: f32) -> Result<(), Failure> {
    if tolerance >= 0.0 && tolerance.is_finite() {
        return Ok(());
    }
    Err(Error::flag("--tolerance", format!("`{tolerance}`: expected a finite number ≥ 0")).into())
}
