//! `expanse generate`: one answer to one prompt, only its text on stdout (or a JSON result).

use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::Ordering;

use clap::Args;

use crate::conversation::{describe_prompt, install_interrupt_handler, stats_line, ChatOptions, Prompter, Reply, Session, GENERATING, INTERRUPT};
use crate::engine::{self, Loaded};
use crate::error::{Error, Result};
use crate::generation::StopReason;
use crate::template::Message;

use super::args::{DecodeArgs, GenArgs, ModelArgs, SkipArgs};
use super::{notices, Failure};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub(super) model: ModelArgs,
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

/// `expanse generate`
pub fn run(args: GenerateArgs) -> Result<(), Failure> {
    let GenerateArgs { model, skip, decode, gen, prompt, raw, json } = args;
    let source = model.source.checkpoint.open()?;
    let opts = gen.options(&source, &decode)?;
    let prompt = read_prompt(prompt)?;
    let loaded = engine::load(&model.options(skip.skip_transparent))?;
    notices(&loaded);
    answer(&loaded, &opts, &prompt, raw, json)?;
    Ok(())
}

/// `--prompt`, else all of stdin (less its final newlines) unless stdin is a terminal; not empty.
fn read_prompt(prompt: Option<String>) -> Result<String> {
    let prompt = match prompt {
        Some(p) => p,
        None if std::io::stdin().is_terminal() => {
            return Err(Error::flag("--prompt", "give --prompt TEXT or pipe the prompt on stdin"));
        }
        None => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| Error::io("<stdin>", e))?;
            text.trim_end_matches('\n').to_string()
        }
    };
    if prompt.trim().is_empty() {
        return Err(Error::flag("--prompt", "the prompt is empty"));
    }
    Ok(prompt)
}

/// `expanse generate --json`: the text, the ids and the timings.
#[derive(Debug, serde::Serialize)]
pub struct GenerateResult {
    pub text: String,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub time_to_first_token_secs: f64,
    /// The one-time build and self-check of the fast path, before the prompt ran.
    pub self_check_secs: f64,
    pub prefill_tokens_per_sec: f64,
    pub decode_tokens_per_sec: f64,
    /// The decode path the answer came from (`reference` after a fallback).
    pub decode_path: crate::step::DecodePath,
    pub launches_per_token: Option<usize>,
}

/// One answer to `prompt` (through the template unless `raw`), streamed to stdout unless `json`,
/// stats to stderr.
fn answer(loaded: &Loaded, opts: &ChatOptions, prompt: &str, raw: bool, json: bool) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(Error::flag("--prompt", "the prompt is empty"));
    }
    let template = if raw { Some("none") } else { opts.template.as_deref() };
    let prompter = Prompter::for_source(&loaded.source, template, &opts.stops)?;
    let (text, ids) = prompter.encode(&messages(opts, prompt, raw))?;
    let mut session = session(loaded, &prompter, opts, ids.len())?;
    if opts.show_prompt {
        eprintln!("{}", describe_prompt(&text, &ids));
    }
    install_interrupt_handler()?;
    let mut out = std::io::stdout().lock();
    GENERATING.store(true, Ordering::SeqCst);
    let reply = session.complete(&ids, &INTERRUPT, &mut |piece| {
        if !json {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    });
    GENERATING.store(false, Ordering::SeqCst);
    let reply = reply?;
    if json {
        let result = GenerateResult::new(&reply, text, ids);
        let text = serde_json::to_string_pretty(&result).map_err(|e| Error::io("<stdout>", std::io::Error::other(e)))?;
        let _ = writeln!(out, "{text}");
    } else {
        let _ = writeln!(out);
    }
    let _ = out.flush();
    eprintln!("{}", stats_line(&reply.stats));
    Ok(())
}

/// The system message (unless `raw`) and the prompt as the user's turn.
fn messages(opts: &ChatOptions, prompt: &str, raw: bool) -> Vec<Message> {
    let mut messages = Vec::new();
    if let Some(s) = opts.system.as_deref().filter(|_| !raw) {
        messages.push(Message::system(s));
    }
    messages.push(Message::user(prompt));
    messages
}

/// A session for one answer, which needs no more context than the prompt and --max-tokens: the
/// cache is allocated for that.
fn session<'m>(loaded: &'m Loaded, prompter: &'m Prompter, opts: &ChatOptions, prompt_tokens: usize) -> Result<Session<'m>> {
    let max_pos = loaded.model.config.max_position_embeddings;
    let ctx = opts.ctx.or(opts.max_tokens.map(|n| prompt_tokens.saturating_add(n).min(max_pos)));
    let mut session = Session::with_decode(&loaded.model, prompter, ctx, opts.sampling.clone(), &opts.decode)?;
    session.max_tokens = opts.max_tokens;
    session.decode_delay = opts.decode_delay;
    session.constrain(opts.grammar.as_ref(), "--json-schema")?;
    Ok(session)
}

impl GenerateResult {
    /// `reply` to the rendered prompt `prompt` of `prompt_ids`.
    fn new(reply: &Reply, prompt: String, prompt_ids: Vec<u32>) -> GenerateResult {
        let s = &reply.stats;
        GenerateResult {
            text: reply.text.clone(),
            prompt,
            prompt_ids,
            generated_ids: s.generated.clone(),
            stop: s.stop,
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.generated.len(),
            prefill_secs: s.prefill_secs,
            decode_secs: s.decode_secs,
            time_to_first_token_secs: s.time_to_first_token_secs,
            self_check_secs: s.self_check_secs,
            prefill_tokens_per_sec: s.prefill_tps(),
            decode_tokens_per_sec: s.decode_tps(),
            decode_path: s.decode_path,
            launches_per_token: s.launches_per_token,
        }
    }
}
