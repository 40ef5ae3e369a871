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

/// Parses the command line. A usage error (unknown flag, flags that exclude each other) is one line
/// like every other bad input — clap's message and tip, without its usage block — and exit 2;
/// `--help` and `--version` print as clap prints them.
fn parse_args() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", one_line(&e.render().to_string()));
            std::process::exit(2);
        }
    }
}

/// clap's multi-line error as one line: its non-empty lines, less the usage hints, joined.
fn one_line(message: &str) -> String {
    let mut line = String::new();
    for part in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if part.starts_with("Usage:") || part.starts_with("For more information") {
            continue;
        }
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    line
}

/// Which checkpoint: shared by every subcommand that reads one.
#[derive(Args, Clone)]
struct CheckpointArgs {
    /// Checkpoint folder or Hugging Face hub id
    #[arg(long, default_value = "openchat/openchat-3.5-0106")]
    model: String,
    /// Hub revision (branch, tag or commit)
    #[arg(long)]
    revision: Option<String>,
}

impl CheckpointArgs {
    /// Resolves --model (and --revision) to its files: cheap, so flags are checked before a load.
    fn open(&self) -> Result<Source, expanse::error::Error> {
        Source::open(&self.model, self.revision.as_deref())
    }
}

/// Which checkpoint and which expansion of it.
#[derive(Args, Clone)]
struct SourceArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Expansion: none, every:N (LLaMA Pro), or a mergekit passthrough YAML
    #[arg(long, default_value = "every:4")]
    expand: String,
}

/// Where and in which precision to run.
#[derive(Args, Clone)]
struct DeviceArgs {
    /// auto, cpu, cuda[:N] or metal[:N]
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (bf16 on GPU, the checkpoint's dtype on CPU), bf16, f16 or f32
    #[arg(long, default_value = "auto")]
    dtype: String,
}

/// Flags every model-running subcommand shares (chat, generate, logits, verify, bench).
#[derive(Args, Clone)]
struct ModelArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    run: DeviceArgs,
}

/// How decode steps run, for the subcommands that generate.
#[derive(Args, Clone)]
struct DecodeArgs {
    /// Decode steps: auto (graph on CUDA, fused on the CPU, reference on Metal), graph, fused or
    /// reference (candle's composed ops); bench takes a comma-separated list
    #[arg(long, value_name = "PATH", default_value = "auto")]
    decode_path: String,
    /// Test hook: perturb the fused step's op OP (in layer LAYER): scaled by -4, or with `:nan` one
    /// element made NaN, to exercise the self-check
    #[arg(long, value_name = "[LAYER:]OP[:nan]", hide = true)]
    inject_fault: Option<String>,
}

impl DecodeArgs {
    /// `--decode-path` and `--inject-fault`, checked.
    fn options(&self) -> Result<expanse::generator::DecodeOptions, expanse::Error> {
        let fault = self.inject_fault.as_deref().map(expanse::step::Fault::parse).transpose()?;
        let path = expanse::step::DecodePath::parse(&self.decode_path)?;
        if fault.is_some() && path == expanse::step::DecodePath::Reference {
            return Err(expanse::Error::flag("--inject-fault", "perturbs the fused step, which --decode-path reference does not run"));
        }
        Ok(expanse::generator::DecodeOptions { path, step: expanse::step::StepOptions { splits: None, fault } })
    }
}

/// `--skip-transparent`, for the subcommands that may leave blocks out (not verify, which must run
/// every block it sets out to prove transparent).
#[derive(Args, Clone)]
struct SkipArgs {
    /// Skip blocks whose o_proj and down_proj were verified to be exactly zero at load time
    #[arg(long)]
    skip_transparent: bool,
}

impl ModelArgs {
    fn options(&self, skip_transparent: bool) -> LoadOptions {
        LoadOptions {
            model: self.source.checkpoint.model.clone(),
            revision: self.source.checkpoint.revision.clone(),
            expand: self.source.expand.clone(),
            device: self.run.device.clone(),
            dtype: self.run.dtype.clone(),
            skip_transparent,
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
    fn options(&self, source: &Source, decode: &DecodeArgs) -> Result<expanse::chat::ChatOptions, Failure> {
        let mut opts = self.prompt.options(source, decode)?;
        opts.show_prompt = self.show_prompt;
        opts.color = expanse::chat::want_color(self.no_color);
        Ok(opts)
    }
}

impl PromptArgs {
    fn options(&self, source: &Source, decode: &DecodeArgs) -> Result<expanse::chat::ChatOptions, Failure> {
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
            decode: decode.options()?,
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
    skip: SkipArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    skip: SkipArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    #[command(flatten)]
    gen: GenArgs,
    /// The prompt (default: all of stdin)
    #[arg(long)]
    prompt: Option<String>,
    /// No chat template: the prompt's text after BOS (so no --system or --chat-template)
    #[arg(long, conflicts_with_all = ["system", "chat_template"])]
    raw: bool,
    /// Print a JSON result (text, token ids, timings) instead of the streamed text
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    source: SourceArgs,
    // Sizes are in --dtype, whose `auto` depends on --device.
    #[command(flatten)]
    run: DeviceArgs,
    /// Plan for a preset's or config.json's shapes instead of --model (e.g. openchat-3.5-0106)
    #[arg(long, value_name = "PRESET|CONFIG.json", conflicts_with_all = ["model", "revision"])]
    synthetic: Option<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    skip: SkipArgs,
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
    /// CPU threads, 1 to 1024 (sets RAYON_NUM_THREADS before any work; default: all cores)
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
    skip: SkipArgs,
    #[command(flatten)]
    decode: DecodeArgs,
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
    /// Seconds a request may take to arrive, from its first byte to the end of its body; a slower
    /// client is disconnected
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    header_timeout: f64,
    /// Seconds a connection may stay open with no request under way
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    idle_timeout: f64,
    /// Most open connections; at the cap the longest-idle one is closed to admit a new one
    /// (default: what the file-descriptor limit, `ulimit -n`, leaves room for)
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Seconds SIGINT/SIGTERM waits for answers under way before closing their connections
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    shutdown_timeout: f64,
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

/// The system allocator, with the memory budget a chat template renders under (`expanse::budget`).
#[global_allocator]
static ALLOC: expanse::budget::BudgetedAlloc = expanse::budget::BudgetedAlloc;

/// How a command failed: a check that ran and failed (exit 1), or an error that knows its exit code.
enum Failure {
    Check(String),
    Error(expanse::Error),
}

impl From<expanse::Error> for Failure {
    fn from(e: expanse::Error) -> Self {
        Failure::Error(e)
    }
}

/// Exit codes (the README's table lists them all): 0 success, 1 a check that ran and failed, 2 bad
/// input, 3 an internal or device failure (a panic included); 130 after Ctrl-C. A reader that closes
/// our output early (`| head`) ends the process by SIGPIPE, as it does `cat` — except `serve`'s.
fn main() -> ExitCode {
    let cli = parse_args();
    // A server writes to its clients, not to a reader of stdout: a client that leaves mid-answer
    // must end its own connection (EPIPE), not the process, so serve keeps Rust's SIG_IGN.
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_pipe();
    }
    if std::env::var("EXPANSE_BACKTRACE").is_ok_and(|v| v == "1") {
        // Read by std (and so candle) when an error captures its backtrace; nothing runs in parallel yet.
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
    }
    std::panic::set_hook(Box::new(report_panic));
    // A panic is reported by the hook in one line; unwinding to here turns it into exit 3.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Failure::Check(msg))) => {
            eprintln!("{msg}");
            ExitCode::from(1)
        }
        Ok(Err(Failure::Error(e))) => {
            let hint = if e.exit_code() == 3 && !expanse::error::backtrace_requested() { BACKTRACE_HINT } else { "" };
            eprintln!("error: {e}{hint}");
            if let Some(bt) = e.backtrace().filter(|_| expanse::error::backtrace_requested()) {
                eprintln!("{bt}");
            }
            ExitCode::from(e.exit_code())
        }
        Err(_) => ExitCode::from(3),
    }
}

const BACKTRACE_HINT: &str = " (EXPANSE_BACKTRACE=1 shows a backtrace)";

/// Rust ignores SIGPIPE, which turns a closed stdout into a panic in `println!`. The default action
/// ends the process quietly instead, as Unix tools do. For the commands that write to stdout only.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called in main right after the arguments are parsed, before any other thread exists;
    // SIG_DFL is a valid disposition for SIGPIPE and no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A panic is a bug: one line saying where, the backtrace only when asked for.
fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    use std::io::Write;
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
    let mut err = std::io::stderr().lock();
    if expanse::error::backtrace_requested() {
        let _ = writeln!(err, "error: internal error: {msg}{at}\n{}", std::backtrace::Backtrace::force_capture());
    } else {
        let _ = writeln!(err, "error: internal error: {msg}{at}{BACKTRACE_HINT}");
    }
}

/// `--tolerance` of verify and compare-logits: NaN would pass every comparison, a negative value none.
fn check_tolerance(tolerance: f32) -> Result<(), Failure> {
    if tolerance >= 0.0 && tolerance.is_finite() {
        return Ok(());
    }
    Err(expanse::Error::flag("--tolerance", format!("`{tolerance}`: expected a finite number ≥ 0")).into())
}

/// A report as JSON (`--json`) or as its table.
fn print_report<T: serde::Serialize + std::fmt::Display>(report: &T, json: bool) -> Result<(), Failure> {
    if json {
        print_json(report)
    } else {
        println!("{report}");
        Ok(())
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(expanse::Error::internal)?;
    println!("{text}");
    Ok(())
}

/// `--device`, with its notice (a fallback to the CPU, an unused GPU) told once on stderr.
fn select_device(spec: &str) -> Result<candle_core::Device, Failure> {
    let choice = expanse::device::select(spec)?;
    if let Some(n) = &choice.notice {
        eprintln!("{n}");
    }
    Ok(choice.device)
}

fn notices(loaded: &engine::Loaded) {
    for n in &loaded.notices {
        eprintln!("{n}");
    }
}

/// Test hook: `EXPANSE_TEST_FAULT=candle|panic` fails the command the way a device error or a bug
/// would, so the tests can check how those are reported (exit 3, one line).
fn injected_fault() -> Result<(), Failure> {
    match std::env::var("EXPANSE_TEST_FAULT").as_deref() {
        Ok("candle") => Err(expanse::Error::from(candle_core::Error::Msg("fault injected by EXPANSE_TEST_FAULT".into()).bt()).into()),
        Ok("panic") => panic!("fault injected by EXPANSE_TEST_FAULT"),
        _ => Ok(()),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    injected_fault()?;
    if let Command::Bench(BenchArgs { threads: Some(t), .. }) = &cli.command {
        expanse::threads::set_count(*t)?;
    }
    match cli.command {
        // The server's model worker thread moves onto the pool itself (its HTTP threads stay off it).
        Command::Serve(args) => serve(args),
        command => expanse::threads::run_on_pool(|| dispatch(command)),
    }
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
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
    let ChatArgs { model, skip, decode, gen } = args;
    // Flags are checked before the (slow) weights load.
    let source = model.source.checkpoint.open()?;
    let opts = gen.options(&source, &decode)?;
    let style = expanse::chat::Style { color: opts.color };
    let loaded = expanse::chat::load_with_summary(&model.options(skip.skip_transparent), style)?;
    expanse::chat::run_chat(&loaded, &opts)?;
    Ok(())
}

/// `expanse generate`
fn generate(args: GenerateArgs) -> Result<(), Failure> {
    let GenerateArgs { model, skip, decode, gen, prompt, raw, json } = args;
    let source = model.source.checkpoint.open()?;
    let opts = gen.options(&source, &decode)?;
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
    let loaded = engine::load(&model.options(skip.skip_transparent))?;
    notices(&loaded);
    expanse::generate::run_generate(&loaded, &opts, &prompt, raw, json)?;
    Ok(())
}

/// `expanse plan`
fn plan(args: PlanArgs) -> Result<(), Failure> {
    let PlanArgs { source, run, synthetic, json } = args;
    let (config, stored, name) = match &synthetic {
        Some(spec) => {
            let cfg = expanse::synthetic::config(spec)?;
            engine::check_plan_fits(&cfg, spec)?;
            let stored = cfg.dtype;
            (cfg, stored, spec.clone())
        }
        None => {
            let opened = source.checkpoint.open()?;
            let stored = opened.stored_dtype();
            (opened.config, stored, source.checkpoint.model.clone())
        }
    };
    let plan = expanse::expand::Plan::from_spec(&source.expand, config.num_hidden_layers, &name)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    let device = select_device(&run.device)?;
    let (dtype, _) = expanse::device::dtype(&run.dtype, &device, stored)?;
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
    let InspectArgs { checkpoint, json } = args;
    let source = checkpoint.open()?;
    let report = expanse::inspect::inspect(&source)?;
    print_report(&report, json)?;
    Ok(())
}

/// `expanse logits`
fn logits(args: LogitsArgs) -> Result<(), Failure> {
    let LogitsArgs { model, skip, ids, prompt, out } = args;
    // Flags first: a bad --ids or --out fails before the model is opened (maybe downloaded) and loaded.
    let ids = ids.map(|t| engine::parse_ids(&t)).transpose()?;
    use expanse::staging::{OutKind, Target};
    Target::check(&out, "--out", OutKind::File, true, &[])?;
    let inputs = model.source.checkpoint.open()?.input_paths(&model.source.expand);
    let target = Target::check(&out, "--out", OutKind::File, true, &inputs)?;
    let loaded = engine::load(&model.options(skip.skip_transparent))?;
    notices(&loaded);
    let ids = match (ids, prompt) {
        (Some(ids), _) => ids,
        (None, Some(p)) => expanse::tokenizer::Tokenizer::for_model(&loaded.source)?.encode(&p, true)?,
        (None, None) => return Err(expanse::Error::flag("--ids", "give --ids or --prompt").into()),
    };
    let vocab = loaded.model.config.vocab_size as u32;
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
        return Err(expanse::Error::flag("--ids", format!("token id {bad} is out of range for vocab size {vocab}")).into());
    }
    expanse::staging::install_interrupt_cleanup();
    let logits = expanse::logits::all_logits(&loaded, &ids)?;
    expanse::logits::write(&target, &ids, &logits)?;
    eprintln!("wrote {} ({} positions × {} vocab, f32)", out.display(), ids.len(), vocab);
    Ok(())
}

/// `expanse verify`
fn verify(args: VerifyArgs) -> Result<(), Failure> {
    let VerifyArgs { model, synthetic, prompt, prompts, ids, raw, steps, tolerance, against, base, json } = args;
    use expanse::verify::{self, Prompts, VerifyOptions};
    check_tolerance(tolerance)?;
    let prompts = if !ids.is_empty() {
        Prompts::Ids(ids.iter().map(|s| engine::parse_ids(s)).collect::<Result<_, _>>()?)
    } else if let Some(file) = prompts {
        Prompts::Texts(verify::read_prompts_file(&file)?)
    } else if !prompt.is_empty() {
        Prompts::Texts(prompt)
    } else {
        Prompts::Builtin
    };
    let opts = VerifyOptions { load: model.options(false), synthetic, prompts, raw, steps, tolerance, against, base };
    let bar = expanse::progress::bar(None, "verify {bar:30} {pos}/{len} prompts {msg}");
    let result = verify::verify(&opts, Some(&bar));
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

/// `expanse expand`
fn expand(args: ExpandArgs) -> Result<(), Failure> {
    let ExpandArgs { source, out, dtype, shard_size, force, json } = args;
    let opts = expanse::export::ExportOptions {
        model: source.checkpoint.model,
        revision: source.checkpoint.revision,
        expand: source.expand,
        dtype,
        out,
        shard_size: expanse::export::parse_shard_size(&shard_size)?,
        force,
        progress: true,
    };
    expanse::staging::install_interrupt_cleanup();
    let report = expanse::export::export(&opts)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    print_report(&report, json)?;
    Ok(())
}

/// `expanse compare-logits`
fn compare_logits(args: CompareLogitsArgs) -> Result<(), Failure> {
    let CompareLogitsArgs { a, b, tolerance, json } = args;
    check_tolerance(tolerance)?;
    let (ia, la) = expanse::logits::read(&a)?;
    let (ib, lb) = expanse::logits::read(&b)?;
    if la.rank() != 2 || la.dims() != lb.dims() {
        let msg = format!("holds logits of shape {:?}; {} holds {:?} (expected [positions, vocab])", lb.dims(), a.display(), la.dims());
        return Err(expanse::Error::bad_file(&b, msg).into());
    }
    if ia != ib {
        return Err(expanse::Error::bad_file(&b, format!("holds other input_ids than {}", a.display())).into());
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
    // Written so that a NaN difference fails.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(c.max_abs_diff <= tolerance) {
        return Err(Failure::Check(format!("FAIL: max |Δlogit| {:.3e} > tolerance {tolerance}", c.max_abs_diff)));
    }
    Ok(())
}

/// `expanse bench`
fn bench(args: BenchArgs) -> Result<(), Failure> {
    // --threads was applied before the pool started (`run`).
    let BenchArgs { model, skip, decode_path, synthetic, prefill, decode, depth, repetitions, warmup, threads: _, variants, json } = args;
    // --skip-transparent frees the zero projections the expanded variant would run.
    let variants = variants.unwrap_or_else(|| {
        if skip.skip_transparent { "base,skip" } else { "base,expanded,skip" }.to_string()
    });
    use expanse::bench::{BenchOptions, BenchTarget, Variant};
    if decode_path.inject_fault.is_some() {
        return Err(expanse::Error::flag("--inject-fault", "is for chat and generate (bench checks the fused path itself)").into());
    }
    let paths = expanse::bench::parse_paths(&decode_path.decode_path)?;
    let opts = BenchOptions { prefill, decode, depth, repetitions, warmup, variants: Variant::parse_list(&variants)?, paths };
    let (name, plan, loaded_model) = match &synthetic {
        Some(spec) => {
            let device = select_device(&model.run.device)?;
            let (plan, m) = engine::load_synthetic(spec, &model.options(skip.skip_transparent), &device)?;
            (format!("synthetic:{spec}"), plan, m)
        }
        None => {
            let loaded = engine::load(&model.options(skip.skip_transparent))?;
            notices(&loaded);
            (loaded.source.files.name.clone(), loaded.plan, loaded.model)
        }
    };
    let bar = expanse::progress::bar(Some(0), "[{bar:30}] {pos}/{len} {msg} ({elapsed})");
    let target = BenchTarget { name, plan: &plan, model: &loaded_model };
    let report = expanse::bench::run(&target, &opts, |label, done, total| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(label.to_string());
    })?;
    bar.finish_and_clear();
    print_report(&report, json)?;
    Ok(())
}

/// `expanse serve`
fn serve(args: ServeArgs) -> Result<(), Failure> {
    let ServeArgs { model, skip, decode, prompt, host, port, queue, api_key, cors, body_limit, max_tokens_cap, prefill_chunk, header_timeout, idle_timeout, max_connections, shutdown_timeout } = args;
    let source = model.source.checkpoint.open()?;
    let chat = prompt.options(&source, &decode)?;
    let opts = expanse::serve::ServeOptions {
        host,
        port,
        queue,
        api_key,
        cors,
        body_limit,
        max_tokens_cap,
        prefill_chunk,
        header_timeout,
        idle_timeout,
        max_connections,
        shutdown_timeout,
        chat,
    };
    expanse::serve::run(source, model.options(skip.skip_transparent), opts)?;
    Ok(())
}
