//! `expanse generate`: one answer to one prompt, only its text on stdout (or a JSON result).

use std::io::Write;
use std::sync::atomic::Ordering;

use crate::chat::{describe_prompt, install_interrupt_handler, stats_line, ChatOptions, Prompter, Session, GENERATING, INTERRUPT};
use crate::engine::Loaded;
use crate::error::{Error, Result};
use crate::generator::StopReason;
use crate::template::Message;

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

/// `expanse generate`: one answer to `prompt` (through the template unless `raw`), streamed to
/// stdout unless `json`, stats to stderr.
pub fn run_generate(loaded: &Loaded, opts: &ChatOptions, prompt: &str, raw: bool, json: bool) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(Error::flag("--prompt", "the prompt is empty"));
    }
    let template = if raw { Some("none") } else { opts.template.as_deref() };
    let prompter = Prompter::for_source(&loaded.source, template, &opts.stops)?;
    let mut messages = Vec::new();
    if let Some(s) = opts.system.as_deref().filter(|_| !raw) {
        messages.push(Message::system(s));
    }
    messages.push(Message::user(prompt));
    let (text, ids) = prompter.encode(&messages)?;
    // One answer needs no more context than the prompt and --max-tokens: the cache is allocated for that.
    let max_pos = loaded.model.config.max_position_embeddings;
    let ctx = opts.ctx.or(opts.max_tokens.map(|n| ids.len().saturating_add(n).min(max_pos)));
    let mut session = Session::with_decode(&loaded.model, &prompter, ctx, opts.sampling.clone(), &opts.decode)?;
    session.max_tokens = opts.max_tokens;
    session.decode_delay = opts.decode_delay;
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
    let s = &reply.stats;
    if json {
        let result = GenerateResult {
            text: reply.text.clone(),
            prompt: text,
            prompt_ids: ids,
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
        };
        let text = serde_json::to_string_pretty(&result).map_err(|e| Error::io("<stdout>", std::io::Error::other(e)))?;
        let _ = writeln!(out, "{text}");
    } else {
        let _ = writeln!(out);
    }
    let _ = out.flush();
    eprintln!("{}", stats_line(s));
    Ok(())
}
