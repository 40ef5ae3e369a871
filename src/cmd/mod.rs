//! The `expanse` commands: clap's command line, one module per subcommand (its flags and what it
//! runs), and how a command fails; `main.rs` only parses, runs and maps the outcome to an exit code.

pub mod args;
pub mod bench;
pub mod chat;
pub mod compare_logits;
pub mod expand;
mod expand_gguf;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod plan;
pub mod serve;
pub mod verify;

use clap::{Parser, Subcommand};

use crate::engine::Loaded;
use crate::error::Error;

#[derive(Parser)]
#[command(name = "expanse", version, about = "Run LLaMA-Pro block-expanded Mistral/Llama models, expanded in memory")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Chat in the terminal with the checkpoint's chat template (one answer per line when piped)
    Chat(chat::ChatArgs),
    /// Generate one answer and write only its text to stdout (stats to stderr)
    Generate(generate::GenerateArgs),
    /// Print the expansion plan: output layer → source layer, scaled tensors, sizes
    Plan(plan::PlanArgs),
    /// Report a checkpoint's architecture, size, copied layers and zero projections
    Inspect(inspect::InspectArgs),
    /// Write f32 logits for every position (tensors `logits` [seq, vocab] and `input_ids`)
    Logits(logits::LogitsArgs),
    /// Prove the expansion transparent: compare the expanded model's logits with its base's, block by block
    Verify(verify::VerifyArgs),
    /// Write the expanded checkpoint to a folder, in mergekit 0.1.5's layout (shards, index, config, YAML, card)
    Expand(expand::ExpandArgs),
    /// Prefill/decode tokens per second of the base, expanded and skip variants, side by side
    Bench(bench::BenchArgs),
    /// Compare two logits files: max |Δ|, argmax agreement, bit-exactness
    CompareLogits(compare_logits::CompareLogitsArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text completions, SSE streaming)
    Serve(serve::ServeArgs),
}

/// How a command failed: a check that ran and failed (exit 1), or an error that knows its exit code.
pub enum Failure {
    Check(String),
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

/// Runs the command: on the CPU's worker pool (`threads`), except `serve`, whose model worker
/// thread moves onto the pool itself (its HTTP threads stay off it).
pub fn run(cli: Cli) -> Result<(), Failure> {
    injected_fault()?;
    if let Some(t) = cli.command.threads() {
        crate::threads::set_count(t)?;
    }
    match cli.command {
        Command::Serve(args) => serve::run(args),
        command => crate::threads::run_on_pool(|| dispatch(command)),
    }
}

impl Command {
    /// `--threads` of a command that runs the model.
    fn threads(&self) -> Option<usize> {
        match self {
            Command::Chat(a) => a.model.threads,
            Command::Generate(a) => a.model.threads,
            Command::Logits(a) => a.model.threads,
            Command::Verify(a) => a.model.threads,
            Command::Bench(a) => a.model.threads,
            Command::Serve(a) => a.model.threads,
            Command::Plan(_) | Command::Inspect(_) | Command::Expand(_) | Command::CompareLogits(_) => None,
        }
    }
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Chat(args) => chat::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Expand(args) => expand::run(args),
        Command::Bench(args) => bench::run(args),
        Command::CompareLogits(args) => compare_logits::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// Test hook: `EXPANSE_TEST_FAULT=candle|panic` fails the command the way a device error or a bug
/// would, so the tests can check how those are reported (exit 3, one line).
fn injected_fault() -> Result<(), Failure> {
    match std::env::var("EXPANSE_TEST_FAULT").as_deref() {
        Ok("candle") => Err(Error::from(candle_core::Error::Msg("fault injected by EXPANSE_TEST_FAULT".into()).bt()).into()),
        Ok("panic") => panic!("fault injected by EXPANSE_TEST_FAULT"),
        _ => Ok(()),
    }
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
    let text = serde_json::to_string_pretty(value).map_err(Error::internal)?;
    println!("{text}");
    Ok(())
}

/// `--device`, with its notice (a fallback to the CPU, an unused GPU) told once on stderr.
fn select_device(spec: &str) -> Result<candle_core::Device, Failure> {
    let choice = crate::device::select(spec)?;
    if let Some(n) = &choice.notice {
        eprintln!("{n}");
    }
    Ok(choice.device)
}

/// The load's notices (a fallback, a skipped block…), on stderr.
fn notices(loaded: &Loaded) {
    for n in &loaded.notices {
        eprintln!("{n}");
    }
}
