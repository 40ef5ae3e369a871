//! The `expanse` command line: argument parsing and exit codes only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use expanse::engine::{self, LoadOptions, Source};
use expanse::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "expanse", version, about = "Run LLaMA-Pro block-expanded Mistral/Llama models, expanded in memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which checkpoint and which expansion of it: shared by every subcommand that reads a model.
#[derive(Args, Clone)]
struct SourceArgs {
    /// Checkpoint folder or Hugging Face hub id
    #[arg(long, default_value = "openchat/openchat-3.5-0106")]
    model: String,
    /// Hub revision (branch, tag or commit)
    #[arg(long)]
    revision: Option<String>,
    /// Expansion: none, every:N (LLaMA Pro), or a mergekit passthrough YAML
    #[arg(long, default_value = "every:4")]
    expand: String,
}

/// Flags every model-running subcommand shares.
#[derive(Args, Clone)]
struct ModelArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// auto, cpu, cuda[:N] or metal
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (bf16 on GPU, the checkpoint's dtype on CPU), bf16, f16 or f32
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Skip blocks whose o_proj and down_proj were verified to be exactly zero at load time
    #[arg(long)]
    skip_transparent: bool,
}

impl SourceArgs {
    /// Resolves --model (and --revision) to its files: cheap, so flags are checked before a load.
    fn open(&self) -> Result<Source, expanse::error::Error> {
        Source::open(&self.model, self.revision.as_deref())
    }
}

impl ModelArgs {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            model: self.source.model.clone(),
            revision: self.source.revision.clone(),
            expand: self.source.expand.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            skip_transparent: self.skip_transparent,
        }
    }
}

/// Prompting and sampling flags shared by `chat`, `generate` and `serve`.
#[derive(Args, Clone)]
struct PromptArgs {
    /// System message, rendered by the chat template
    #[arg(long)]
    system: Option<String>,
    /// Chat template: a Jinja file, `openchat` (built in) or `none`; default: the checkpoint's
    #[arg(long, value_name = "FILE|openchat|none")]
    chat_template: Option<String>,
    /// Also stop at this text (repeatable); a special token's text stops at its id
    #[arg(long, value_name = "STRING")]
    stop: Vec<String>,
    /// Most tokens per answer (default: until a stop token or the context is full)
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Context length in tokens (default and maximum: the model's max_position_embeddings)
    #[arg(long, value_name = "N")]
    ctx: Option<usize>,
    /// 0 = greedy (default: generation_config.json, else 0.8)
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling; 1 disables (default: generation_config.json, else 0.95)
    #[arg(long)]
    top_p: Option<f64>,
    /// 0 disables (default: generation_config.json, else 40)
    #[arg(long)]
    top_k: Option<usize>,
    /// Drop tokens below this fraction of the top token's probability; 0 disables (default 0.05)
    #[arg(long)]
    min_p: Option<f64>,
    /// Penalise the last --repeat-last-n tokens; 1 disables (default: generation_config.json, else 1)
    #[arg(long)]
    repeat_penalty: Option<f32>,
    #[arg(long)]
    repeat_last_n: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Pause between decode steps (for terminal and server tests)
    #[arg(long, hide = true, default_value_t = 0)]
    decode_delay_ms: u64,
}

/// The terminal's flags over the prompting ones: `chat` and `generate`.
#[derive(Args, Clone)]
struct GenArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    /// Print the rendered prompt and its token ids (to stderr) before generating
    #[arg(long)]
    show_prompt: bool,
    /// No ANSI colours (NO_COLOR is honoured too)
    #[arg(long)]
    no_color: bool,
}

impl GenArgs {
    fn options(&self, source: &Source) -> Result<expanse::chat::ChatOptions, Failure> {
        let mut opts = self.prompt.options(source)?;
        opts.show_prompt = self.show_prompt;
        opts.color = expanse::chat::want_color(self.no_color);
        Ok(opts)
    }
}

impl PromptArgs {
    fn options(&self, source: &Source) -> Result<expanse::chat::ChatOptions, Failure> {
        let mut sampling = SamplingParams::from_generation_config(&source.generation);
        let flags: [(&str, Option<String>); 7] = [
            ("temperature", self.temperature.map(|v| v.to_string())),
            ("top_p", self.top_p.map(|v| v.to_string())),
            ("top_k", self.top_k.map(|v| v.to_string())),
            ("min_p", self.min_p.map(|v| v.to_string())),
            ("repeat_penalty", self.repeat_penalty.map(|v| v.to_string())),
            ("repeat_last_n", self.repeat_last_n.map(|v| v.to_string())),
            ("seed", self.seed.map(|v| v.to_string())),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                sampling.set(key, &v).map_err(|e| expanse::Error::flag(&format!("--{}", key.replace('_', "-")), e))?;
            }
        }
        let max_pos = source.config.max_position_embeddings;
        match self.ctx {
            Some(0) => return Err(expanse::Error::flag("--ctx", "must be at least 1").into()),
            Some(n) if n > max_pos => {
                return Err(expanse::Error::flag("--ctx", format!("{n} exceeds the model's max_position_embeddings {max_pos}")).into())
            }
            _ => {}
        }
        if self.max_tokens == Some(0) {
            return Err(expanse::Error::flag("--max-tokens", "must be at least 1").into());
        }
        Ok(expanse::chat::ChatOptions {
            system: self.system.clone(),
            template: self.chat_template.clone(),
            stops: self.stop.clone(),
            max_tokens: self.max_tokens,
            ctx: self.ctx,
            sampling,
            show_prompt: false,
            color: false,
            decode_delay: std::time::Duration::from_millis(self.decode_delay_ms),
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Chat in the terminal with the checkpoint's chat template (one answer per line when piped)
    Chat(ChatArgs),
    /// Generate one answer and write only its text to stdout (stats to stderr)
    Generate(GenerateArgs),
    /// Print the expansion plan: output layer → source layer, scaled tensors, sizes
    Plan(PlanArgs),
    /// Report a checkpoint's architecture, size, copied layers and zero projections
    Inspect(InspectArgs),
    /// Write f32 logits for every position (tensors `logits` [seq, vocab] and `input_ids`)
    Logits(LogitsArgs),
    /// Prove the expansion transparent: compare the expanded model's logits with its base's, block by block
    Verify(VerifyArgs),
    /// Write the expanded checkpoint to a folder, in mergekit 0.1.5's layout (shards, index, config, YAML, card)
    Expand(ExpandArgs),
    /// Prefill/decode tokens per second of the base, expanded and skip variants, side by side
    Bench(BenchArgs),
    /// Compare two logits files: max |Δ|, argmax agreement, bit-exactness
    CompareLogits(CompareLogitsArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text completions, SSE streaming)
    Serve(ServeArgs),
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: GenArgs,
    /// The prompt (default: all of stdin)
    #[arg(long)]
    prompt: Option<String>,
    /// No chat template: the prompt's text after BOS
    #[arg(long)]
    raw: bool,
    /// Print a JSON result (text, token ids, timings) instead of the streamed text
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Plan for a preset's or config.json's shapes instead of --model (e.g. openchat-3.5-0106)
    #[arg(long)]
    synthetic: Option<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, comma-separated
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    ids: Option<String>,
    /// Text to tokenize (with the tokenizer's BOS, no chat template)
    #[arg(long)]
    prompt: Option<String>,
    /// Output .safetensors file
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Random weights in a preset's or config.json's shapes instead of --model (prompts are random ids)
    #[arg(long, value_name = "PRESET|CONFIG.json", conflicts_with = "model")]
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
    /// Tokenize prompts as they are (with BOS) instead of the OpenChat chat format
    #[arg(long)]
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

#[derive(Args)]
struct ExpandArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Output folder (written beside it first, then renamed into place)
    #[arg(long)]
    out: PathBuf,
    /// auto (the YAML's dtype, else the checkpoint's), bf16, f16 or f32
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Largest shard, in tensor bytes (mergekit's rule): 5B, 5GB, 500MB or a byte count
    #[arg(long, default_value = "5B")]
    shard_size: String,
    /// Replace a non-empty --out folder
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Random weights in a preset's shapes (openchat-3.5-0106) or a config.json's, instead of --model
    #[arg(long)]
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
    /// CPU threads (sets RAYON_NUM_THREADS before any work; default: all cores)
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Variants to run: base, expanded, skip (comma-separated) [default: base,expanded,skip; with
    /// --skip-transparent: base,skip]
    #[arg(long)]
    variants: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Address to listen on (0.0.0.0 exposes the server to the network)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests that may wait while one is answered; more get 503
    #[arg(long, value_name = "N", default_value_t = 32)]
    queue: usize,
    /// Require `Authorization: Bearer KEY` (prefer the environment variable: arguments show in `ps`)
    #[arg(long, env = "EXPANSE_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
    /// Allow browser pages from ORIGIN (`*` for any) to call the API; no CORS headers without it
    #[arg(long, value_name = "ORIGIN")]
    cors: Option<String>,
    /// Largest request body in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    body_limit: usize,
    /// Most tokens a request may ask for (max_tokens); also the answer length when it names none
    /// and --max-tokens is not given
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_tokens_cap: usize,
    /// Prompts run in chunks of N tokens starting at multiples of N, so a prompt's answer does not
    /// depend on what ran before it; a prompt that extends an earlier one reuses its whole chunks
    #[arg(long, value_name = "N", default_value_t = 256)]
    prefill_chunk: usize,
}

#[derive(Args)]
struct CompareLogitsArgs {
    a: PathBuf,
    b: PathBuf,
    /// Fail (exit 1) when max |Δ| exceeds this
    #[arg(long, default_value_t = 0.0)]
    tolerance: f32,
    #[arg(long)]
    json: bool,
}

/// Errors a user caused (exit 2) vs a check that ran and failed (exit 1).
enum Failure {
    BadInput(anyhow::Error),
    Check(String),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::BadInput(e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Check(msg)) => {
            eprintln!("{msg}");
            ExitCode::from(1)
        }
        Err(Failure::BadInput(e)) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::from(2)
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Progress to stderr, drawn only on a terminal so logs and pipes stay clean.
fn progress_target() -> indicatif::ProgressDrawTarget {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    }
}

fn notices(loaded: &engine::Loaded) {
    for n in &loaded.notices {
        eprintln!("{n}");
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Chat(args) => chat(args),
        Command::Generate(args) => generate(args),
        Command::Plan(args) => plan(args),
        Command::Inspect(args) => inspect(args),
        Command::Logits(args) => logits(args),
        Command::Verify(args) => verify(args),
        Command::Expand(args) => expand(args),
        Command::Bench(args) => bench(args),
        Command::CompareLogits(args) => compare_logits(args),
        Command::Serve(args) => serve(args),
    }
}

/// `expanse chat`
fn chat(args: ChatArgs) -> Result<(), Failure> {
    let ChatArgs { model, gen } = args;
    // Flags are checked before the (slow) weights load.
    let source = model.source.open()?;
    let opts = gen.options(&source)?;
    let style = expanse::chat::Style { color: opts.color };
    let loaded = expanse::chat::load_with_progress(&model.options(), style)?;
    expanse::chat::run_chat(&loaded, &opts)?;
    Ok(())
}

/// `expanse generate`
fn generate(args: GenerateArgs) -> Result<(), Failure> {
    let GenerateArgs { model, gen, prompt, raw, json } = args;
    let source = model.source.open()?;
    let opts = gen.options(&source)?;
    let prompt = match prompt {
        Some(p) => p,
        None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
            return Err(expanse::Error::flag("--prompt", "give --prompt TEXT or pipe the prompt on stdin").into());
        }
        None => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| expanse::Error::io("<stdin>", e))?;
            text.trim_end_matches('\n').to_string()
        }
    };
    if prompt.trim().is_empty() {
        return Err(expanse::Error::flag("--prompt", "the prompt is empty").into());
    }
    let loaded = engine::load(&model.options())?;
    notices(&loaded);
    expanse::generate::run_generate(&loaded, &opts, &prompt, raw, json)?;
    Ok(())
}

/// `expanse plan`
fn plan(args: PlanArgs) -> Result<(), Failure> {
    let PlanArgs { model, synthetic, json } = args;
    let (config, stored, name) = match &synthetic {
        Some(spec) => {
            let cfg = expanse::synthetic::config(spec)?;
            let stored = cfg.dtype;
            (cfg, stored, spec.clone())
        }
        None => {
            let source = model.source.open()?;
            let stored = source.stored_dtype();
            (source.config, stored, model.source.model.clone())
        }
    };
    let plan = expanse::expand::Plan::from_spec(&model.source.expand, config.num_hidden_layers, &name)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    let device = expanse::device::select(&model.device)?;
    let (dtype, _) = expanse::device::dtype(&model.dtype, &device, stored)?;
    if json {
        let totals = plan.totals(&config, dtype);
        print_json(&serde_json::json!({ "spec": plan.spec, "plan": plan, "totals": totals }))?;
    } else {
        println!("{}", plan.table(&config, dtype));
    }
    Ok(())
}

/// `expanse inspect`
fn inspect(args: InspectArgs) -> Result<(), Failure> {
    let InspectArgs { model, json } = args;
    let source = model.source.open()?;
    let report = expanse::inspect::inspect(&source)?;
    if json {
        print_json(&report)?;
    } else {
        println!("{report}");
    }
    Ok(())
}

/// `expanse logits`
fn logits(args: LogitsArgs) -> Result<(), Failure> {
    let LogitsArgs { model, ids, prompt, out } = args;
    let loaded = engine::load(&model.options())?;
    notices(&loaded);
    let ids = match (ids, prompt) {
        (Some(ids), _) => engine::parse_ids(&ids)?,
        (None, Some(p)) => expanse::tokenizer::Tokenizer::for_model(&loaded.source)?.encode(&p, true)?,
        (None, None) => unreachable!("clap requires --ids or --prompt"),
    };
    let vocab = loaded.model.config.vocab_size as u32;
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
        return Err(expanse::Error::flag("--ids", format!("token id {bad} is out of range for vocab size {vocab}")).into());
    }
    let logits = expanse::logits::all_logits(&loaded, &ids)?;
    expanse::logits::write(&out, &ids, &logits)?;
    eprintln!("wrote {} ({} positions × {} vocab, f32)", out.display(), ids.len(), vocab);
    Ok(())
}

/// `expanse verify`
fn verify(args: VerifyArgs) -> Result<(), Failure> {
    let VerifyArgs { model, synthetic, prompt, prompts, ids, raw, steps, tolerance, against, base, json } = args;
    use expanse::verify::{self, Prompts, VerifyOptions};
    if !(tolerance >= 0.0 && tolerance.is_finite()) {
        return Err(expanse::Error::flag("--tolerance", format!("`{tolerance}`: expected a finite number ≥ 0")).into());
    }
    let prompts = if !ids.is_empty() {
        Prompts::Ids(ids.iter().map(|s| engine::parse_ids(s)).collect::<Result<_, _>>()?)
    } else if let Some(file) = prompts {
        Prompts::Texts(verify::read_prompts_file(&file)?)
    } else if !prompt.is_empty() {
        Prompts::Texts(prompt)
    } else {
        Prompts::Builtin
    };
    let opts = VerifyOptions { load: model.options(), synthetic, prompts, raw, steps, tolerance, against, base };
    let bar = indicatif::ProgressBar::with_draw_target(None, progress_target());
    bar.set_style(
        indicatif::ProgressStyle::with_template("verify {bar:30} {pos}/{len} prompts {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = verify::verify(&opts, Some(&bar));
    bar.finish_and_clear();
    let report = result?;
    for n in &report.notices {
        eprintln!("{n}");
    }
    if json {
        print_json(&report)?;
    } else {
        println!("{report}");
    }
    if !report.verdict.pass {
        return Err(Failure::Check(report.verdict.message.clone()));
    }
    Ok(())
}

/// `expanse expand`
fn expand(args: ExpandArgs) -> Result<(), Failure> {
    let ExpandArgs { source, out, dtype, shard_size, force, json } = args;
    let opts = expanse::export::ExportOptions {
        model: source.model,
        revision: source.revision,
        expand: source.expand,
        dtype,
        out,
        shard_size: expanse::export::parse_shard_size(&shard_size)?,
        force,
        progress: true,
    };
    expanse::export::install_interrupt_cleanup();
    let report = expanse::export::export(&opts)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        print_json(&report)?;
    } else {
        println!("{report}");
    }
    Ok(())
}

/// `expanse compare-logits`
fn compare_logits(args: CompareLogitsArgs) -> Result<(), Failure> {
    let CompareLogitsArgs { a, b, tolerance, json } = args;
    let (ia, la) = expanse::logits::read(&a)?;
    let (ib, lb) = expanse::logits::read(&b)?;
    if ia != ib {
        return Err(anyhow::anyhow!("{} and {} hold different input_ids", a.display(), b.display()).into());
    }
    let c = expanse::logits::compare(&la, &lb)?;
    if json {
        print_json(&c)?;
    } else {
        println!(
            "positions {} · max |Δlogit| {:.3e} · argmax agreement {:.1}% · bit-exact {}",
            c.positions,
            c.max_abs_diff,
            100.0 * c.argmax_agreement,
            if c.bit_exact { "yes" } else { "no" }
        );
    }
    if c.max_abs_diff > tolerance {
        return Err(Failure::Check(format!("FAIL: max |Δlogit| {:.3e} > tolerance {tolerance}", c.max_abs_diff)));
    }
    Ok(())
}

/// `expanse bench`
fn bench(args: BenchArgs) -> Result<(), Failure> {
    let BenchArgs { model, synthetic, prefill, decode, depth, repetitions, warmup, threads, variants, json } = args;
    if let Some(t) = threads {
        if t == 0 {
            return Err(expanse::Error::flag("--threads", "at least 1").into());
        }
        // Read by rayon's global pool and candle's gemm when they first start, which is below.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    // --skip-transparent frees the zero projections the expanded variant would run.
    let variants = variants.unwrap_or_else(|| {
        if model.skip_transparent { "base,skip" } else { "base,expanded,skip" }.to_string()
    });
    use expanse::bench::{BenchOptions, BenchTarget, Variant};
    let opts = BenchOptions { prefill, decode, depth, repetitions, warmup, variants: Variant::parse_list(&variants)? };
    let (name, plan, loaded_model) = match &synthetic {
        Some(spec) => {
            let device = expanse::device::select(&model.device)?;
            let (plan, m) = engine::load_synthetic(spec, &model.options(), &device)?;
            (format!("synthetic:{spec}"), plan, m)
        }
        None => {
            let loaded = engine::load(&model.options())?;
            notices(&loaded);
            (loaded.source.files.name.clone(), loaded.plan, loaded.model)
        }
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let target = BenchTarget { name, plan: &plan, model: &loaded_model };
    let report = expanse::bench::run(&target, &opts, |label, done, total| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(label.to_string());
    })?;
    bar.finish_and_clear();
    if json {
        print_json(&report)?;
    } else {
        println!("{report}");
    }
    Ok(())
}

/// `expanse serve`
fn serve(args: ServeArgs) -> Result<(), Failure> {
    let ServeArgs { model, prompt, host, port, queue, api_key, cors, body_limit, max_tokens_cap, prefill_chunk } = args;
    let source = model.source.open()?;
    let chat = prompt.options(&source)?;
    let opts = expanse::serve::ServeOptions { host, port, queue, api_key, cors, body_limit, max_tokens_cap, prefill_chunk, chat };
    expanse::serve::run(source, model.options(), opts)?;
    Ok(())
}
