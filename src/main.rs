//! The `expanse` command line: argument parsing and exit codes only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use expanse::engine::{self, LoadOptions, Source};

#[derive(Parser)]
#[command(name = "expanse", version, about = "Run LLaMA-Pro block-expanded Mistral/Llama models, expanded in memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags every model-loading subcommand shares.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Checkpoint folder or Hugging Face hub id
    #[arg(long, default_value = "openchat/openchat-3.5-0106")]
    model: String,
    /// Hub revision (branch, tag or commit)
    #[arg(long)]
    revision: Option<String>,
    /// Expansion: none, every:N (LLaMA Pro), or a mergekit passthrough YAML
    #[arg(long, default_value = "every:4")]
    expand: String,
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

impl ModelArgs {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            model: self.model.clone(),
            revision: self.revision.clone(),
            expand: self.expand.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            skip_transparent: self.skip_transparent,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print the expansion plan: output layer → source layer, scaled tensors, sizes
    Plan {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Report a checkpoint's architecture, size, copied layers and zero projections
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write f32 logits for every position (tensors `logits` [seq, vocab] and `input_ids`)
    Logits {
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
    },
    /// Prefill/decode tokens per second of the base, expanded and skip variants, side by side
    Bench {
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
        /// Variants to run: base, expanded, skip (comma-separated)
        #[arg(long, default_value = "base,expanded,skip")]
        variants: String,
        #[arg(long)]
        json: bool,
    },
    /// Compare two logits files: max |Δ|, argmax agreement, bit-exactness
    CompareLogits {
        a: PathBuf,
        b: PathBuf,
        /// Fail (exit 1) when max |Δ| exceeds this
        #[arg(long, default_value_t = 0.0)]
        tolerance: f32,
        #[arg(long)]
        json: bool,
    },
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

fn notices(loaded: &engine::Loaded) {
    for n in &loaded.notices {
        eprintln!("{n}");
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Plan { model, json } => {
            let source = Source::open(&model.model, model.revision.as_deref())?;
            let plan = expanse::expand::Plan::from_spec(&model.expand, source.config.num_hidden_layers, &model.model)?;
            for w in &plan.warnings {
                eprintln!("warning: {w}");
            }
            let device = expanse::device::select(&model.device)?;
            let (dtype, _) = expanse::device::dtype(&model.dtype, &device, source.stored_dtype())?;
            if json {
                let totals = plan.totals(&source.config, dtype);
                print_json(&serde_json::json!({ "spec": plan.spec, "plan": plan, "totals": totals }))?;
            } else {
                println!("{}", plan.table(&source.config, dtype));
            }
        }
        Command::Inspect { model, json } => {
            let source = Source::open(&model.model, model.revision.as_deref())?;
            let report = expanse::inspect::inspect(&source)?;
            if json {
                print_json(&report)?;
            } else {
                println!("{report}");
            }
        }
        Command::Logits { model, ids, prompt, out } => {
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
        }
        Command::Bench { model, synthetic, prefill, decode, depth, repetitions, warmup, threads, variants, json } => {
            if let Some(t) = threads {
                if t == 0 {
                    return Err(expanse::Error::flag("--threads", "at least 1").into());
                }
                // Read by rayon's global pool and candle's gemm when they first start, which is below.
                std::env::set_var("RAYON_NUM_THREADS", t.to_string());
            }
            bench(model, synthetic, prefill, decode, depth, repetitions, warmup, &variants, json)?;
        }
        Command::CompareLogits { a, b, tolerance, json } => {
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
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench(
    model: ModelArgs,
    synthetic: Option<String>,
    prefill: usize,
    decode: usize,
    depth: usize,
    repetitions: usize,
    warmup: usize,
    variants: &str,
    json: bool,
) -> Result<(), Failure> {
    use expanse::bench::{BenchOptions, BenchTarget, Variant};
    let opts = BenchOptions { prefill, decode, depth, repetitions, warmup, variants: Variant::parse_list(variants)? };
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
