//! Conversations, shared by `chat`, `generate` and `serve`: prompts built with the chat template, a
//! session that keeps the KV cache across turns and trims old turns to fit the context, the stats
//! line, and Ctrl-C as "stop the answer".

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::constraint::{Constraint, Grammar, Vocabulary};
use crate::engine::Source;
use crate::error::{Error, Result};
use crate::generation::{generate, DecodeOptions, GenerationStats, Generator, StopReason};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::staging::{OutKind, Staging, Target};
use crate::stream::TextStream;
use crate::template::{ChatTemplate, Ending, Message};
use crate::tokenizer::Tokenizer;

/// Tokenizer + template + stop conditions: everything that turns messages into ids and back.
pub struct Prompter {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// The tokens as constrained decoding sees them, built the first time an answer needs it.
    vocabulary: OnceLock<std::result::Result<Vocabulary, String>>,
}

impl Prompter {
    /// Stops on the union of `eos_ids` (generation_config / config), the tokenizer's eos token, the
    /// template's turn terminator and `extra_stops` (a special token's text counts as its id).
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate, eos_ids: &[u32], extra_stops: &[String]) -> Prompter {
        let mut stop_ids: Vec<u32> = eos_ids.to_vec();
        if let Some(id) = template.special.eos_token.as_deref().and_then(|t| tokenizer.token_id(t)) {
            stop_ids.push(id);
        }
        if let Some(suffix) = template.turn_suffix() {
            // The terminator is the added (special) token the suffix starts with, e.g. `<|im_end|>` of `<|im_end|>\n`.
            let added = tokenizer.inner().get_added_tokens_decoder();
            if let Some(first) = tokenizer.encode(&suffix, false).ok().and_then(|ids| ids.first().copied()) {
                if added.contains_key(&first) {
                    stop_ids.push(first);
                }
            }
        }
        let base = Prompter { tokenizer, template, stop_ids, stop_strings: Vec::new(), vocabulary: OnceLock::new() };
        let (stop_ids, stop_strings) = base.with_stops(extra_stops);
        Prompter { stop_ids, stop_strings, ..base }
    }

    /// The vocabulary constrained decoding works with (`constraint`), its finished grammars ending on
    /// this prompter's stop tokens. Built once (tens of milliseconds for 32k tokens).
    pub fn vocabulary(&self) -> Result<&Vocabulary> {
        let v = self.vocabulary.get_or_init(|| Vocabulary::new(&self.tokenizer, &self.stop_ids).map_err(|e| e.to_string()));
        v.as_ref().map_err(|e| Error::Grammar(e.clone()))
    }

    /// This prompter's stop ids and strings with `extra` added: a special token's text stops at its
    /// id, any other text as a string (a request's own `stop` in `expanse serve`).
    pub fn with_stops(&self, extra: &[String]) -> (Vec<u32>, Vec<String>) {
        let (mut ids, mut strings) = (self.stop_ids.clone(), self.stop_strings.clone());
        let added = self.tokenizer.inner().get_added_tokens_decoder();
        for s in extra {
            match self.tokenizer.token_id(s).filter(|id| added.contains_key(id)) {
                Some(id) => ids.push(id),
                None => strings.push(s.clone()),
            }
        }
        ids.sort_unstable();
        ids.dedup();
        (ids, strings)
    }

    /// The checkpoint's tokenizer and template (or `template_spec`: a file, `openchat` or `none`).
    pub fn for_source(source: &Source, template_spec: Option<&str>, extra_stops: &[String]) -> Result<Prompter> {
        let tokenizer = Tokenizer::for_model(source)?;
        let mut template = ChatTemplate::resolve(template_spec, source.template_dir(), source.files.tokenizer_config.as_deref())?;
        // No token is longer than the longest in the vocabulary (×4 for normalizers that drop text),
        // so a longer prompt cannot fit the model's context: stop rendering it early.
        let most = source.config.max_position_embeddings.saturating_mul(tokenizer.longest_token_bytes()).saturating_mul(4);
        template.set_output_limit(most);
        Ok(Prompter::new(tokenizer, template, &source.eos_token_ids(), extra_stops))
    }

    /// The rendered prompt (assistant turn opened) and its ids. A chat template writes BOS itself, so
    /// the tokenizer's own special-token post-processing must not add a second one; a raw prompt (no
    /// template) gets what that post-processing adds (BOS for Llama/Mistral, none for SmolLM2), as
    /// transformers' `tokenizer(text)` does.
    pub fn encode(&self, messages: &[Message]) -> Result<(String, Vec<u32>)> {
        self.encode_ending(messages, Ending::Open)
    }

    /// [`Prompter::encode`], the rendering ending as `ending` says (see `ChatTemplate::render_ending`).
    pub fn encode_ending(&self, messages: &[Message], ending: Ending) -> Result<(String, Vec<u32>)> {
        self.encode_with_tools(messages, ending, None)
    }

    /// [`encode_ending`](Self::encode_ending), the template given `tools` (a request's function list).
    pub fn encode_with_tools(&self, messages: &[Message], ending: Ending, tools: Option<&serde_json::Value>) -> Result<(String, Vec<u32>)> {
        let text = self.template.render_with_tools(messages, ending, tools)?;
        let ids = self.tokenizer.encode(&text, self.template.is_raw())?;
        if ids.is_empty() {
            return Err(Error::template("the prompt renders to no tokens", Some(&self.template.origin)));
        }
        Ok((text, ids))
    }
}

/// How `--show-prompt` prints a prompt: its text, then its ids as a list.
pub fn describe_prompt(text: &str, ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("{text}\n[{}] ({} tokens)", list.join(", "), ids.len())
}

/// One answer and what it cost.
#[derive(Debug, Clone)]
pub struct Reply {
    pub text: String,
    pub stats: GenerationStats,
    /// Messages dropped from the start of the conversation to fit the context.
    pub dropped: usize,
    pub prompt_ids: Vec<u32>,
}

/// A conversation with one model: the messages, the cache holding them, and the sampling settings.
pub struct Session<'m> {
    pub prompter: &'m Prompter,
    generator: Generator<'m>,
    pub messages: Vec<Message>,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    /// Throttle between decode steps (the terminal tests use it to interrupt reliably).
    pub decode_delay: Duration,
    pub last: Option<GenerationStats>,
    pub answers: usize,
    pub generated_total: usize,
    /// Canonical paths the chat reads (the model, its expansion YAML and chat template, the
    /// history): `/save` refuses to write over or inside them.
    pub inputs: Vec<PathBuf>,
    /// The grammar every answer follows (`--json-schema`), compiled; each answer starts a copy.
    constraint: Option<Constraint>,
}

impl<'m> Session<'m> {
    /// `ctx` caps the context below the model's max_position_embeddings. Decodes on the fastest path
    /// the device has.
    pub fn new(model: &'m Model, prompter: &'m Prompter, ctx: Option<usize>, sampling: SamplingParams) -> Result<Session<'m>> {
        Session::with_decode(model, prompter, ctx, sampling, &DecodeOptions::default())
    }

    /// [`Session::new`] on the decode path `decode` asks for.
    pub fn with_decode(model: &'m Model, prompter: &'m Prompter, ctx: Option<usize>, sampling: SamplingParams, decode: &DecodeOptions) -> Result<Session<'m>> {
        let generator = Generator::with_decode(model, check_ctx(ctx, model)?, decode)?;
        Ok(Session {
            prompter,
            generator,
            messages: Vec::new(),
            sampling,
            max_tokens: None,
            decode_delay: Duration::ZERO,
            last: None,
            answers: 0,
            generated_total: 0,
            inputs: Vec::new(),
            constraint: None,
        })
    }

    /// Makes every answer follow `grammar` (`--json-schema`); a schema llguidance cannot compile is
    /// an error naming `flag`.
    pub fn constrain(&mut self, grammar: Option<&Grammar>, flag: &str) -> Result<()> {
        self.constraint = match grammar {
            Some(g) => Some(Constraint::new(self.prompter.vocabulary()?, g).map_err(|e| Error::flag(flag, e))?),
            None => None,
        };
        Ok(())
    }

    pub fn context(&self) -> usize {
        self.generator.context()
    }

    /// The decode path in use (`reference` after a fallback).
    pub fn decode_path(&self) -> crate::step::DecodePath {
        self.generator.decode_path()
    }

    /// Tokens the cache holds now.
    pub fn context_used(&self) -> usize {
        self.generator.tokens.len()
    }

    pub fn system(&self) -> Option<&str> {
        self.messages.first().filter(|m| m.role == "system").map(|m| m.content.as_str())
    }

    /// Sets (or with `None` clears) the system message; the cache is re-used up to where they differ.
    pub fn set_system(&mut self, text: Option<&str>) {
        if self.system().is_some() {
            self.messages.remove(0);
        }
        if let Some(t) = text.filter(|t| !t.trim().is_empty()) {
            self.messages.insert(0, Message::system(t));
        }
    }

    /// A new conversation (the system message stays) with an empty cache.
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
        self.generator.reset();
        self.last = None;
    }

    /// Renders the conversation plus the opened assistant turn, dropping the oldest turns until the
    /// prompt leaves room to answer (a quarter of the context, or `max_tokens` if smaller). A
    /// conversation too long even to render (a `/load`ed one, say) is cut the same way.
    fn fit(&mut self) -> Result<(String, Vec<u32>, usize)> {
        let ctx = self.generator.context();
        let reserve = self.max_tokens.unwrap_or(usize::MAX).min(ctx / 4).max(1);
        let (head, cuts) = self.cuts();
        let fits = |ids: &[u32]| ids.len() + reserve <= ctx;
        if let Some((text, ids)) = self.render_from(head, cuts[0])?.filter(|(_, ids)| fits(ids)) {
            return Ok((text, ids, 0));
        }
        // The first cut that fits, by bisection: a conversation of thousands of messages is cut in a
        // dozen renders, not thousands (fewer messages never render to a longer prompt).
        let (mut lo, mut hi, mut found) = (1, cuts.len(), None);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.render_from(head, cuts[mid])?.filter(|(_, ids)| fits(ids)) {
                Some(prompt) => (hi, found) = (mid, Some(prompt)),
                None => lo = mid + 1,
            }
        }
        let last = cuts[cuts.len() - 1];
        let (text, ids, cut) = match found {
            Some((text, ids)) => (text, ids, cuts[lo]),
            // Not even the turn being answered leaves room to answer: run it if it fits at all.
            None => match self.render_from(head, last)? {
                Some((text, ids)) if ids.len() < ctx => (text, ids, last),
                Some((_, ids)) => return Err(Error::ContextTooSmall { prompt: ids.len(), context: ctx }),
                None => return Err(self.prompter.template.too_long()),
            },
        };
        self.messages.drain(head..cut);
        Ok((text, ids, cut - head))
    }

    /// Where the leading system messages end, and the indices a shortened conversation may restart
    /// at: its first message after them, each later message that is not an assistant's (a
    /// conversation starts with a user turn, as templates expect), and always the turn being answered.
    fn cuts(&self) -> (usize, Vec<usize>) {
        let n = self.messages.len();
        let head = self.messages.iter().position(|m| m.role != "system").unwrap_or(n);
        if head == n {
            return (n, vec![n]);
        }
        let mut cuts: Vec<usize> = (head..n).filter(|&i| i == head || self.messages[i].role != "assistant").collect();
        if cuts.last() != Some(&(n - 1)) {
            cuts.push(n - 1);
        }
        (head, cuts)
    }

    /// The prompt of the system messages and the conversation from `cut` on; None when it renders
    /// past what the context can hold.
    fn render_from(&self, head: usize, cut: usize) -> Result<Option<(String, Vec<u32>)>> {
        let kept: Vec<Message> = self.messages[..head].iter().chain(&self.messages[cut..]).cloned().collect();
        match self.prompter.encode(&kept) {
            Ok(prompt) => Ok(Some(prompt)),
            Err(Error::PromptTooLong { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The prompt the next turn `user` would run (for `--show-prompt`), without changing anything.
    pub fn preview(&self, user: &str) -> Result<(String, Vec<u32>)> {
        let mut msgs = self.messages.clone();
        msgs.push(Message::user(user));
        self.prompter.encode(&msgs)
    }

    /// Answers `user`: streams the text through `on_text` and keeps the answer — even an interrupted
    /// one — in the conversation. Setting `interrupt` stops after the current token.
    pub fn send(&mut self, user: &str, interrupt: &AtomicBool, on_text: &mut dyn FnMut(&str)) -> Result<Reply> {
        let saved = self.messages.clone();
        self.messages.push(Message::user(user));
        let (_, prompt_ids, dropped) = match self.fit() {
            Ok(v) => v,
            Err(e) => {
                self.messages = saved;
                return Err(e);
            }
        };
        let mut reply = match self.complete(&prompt_ids, interrupt, on_text) {
            Ok(r) => r,
            Err(e) => {
                self.messages = saved;
                return Err(e);
            }
        };
        reply.dropped = dropped;
        self.messages.push(Message::assistant(reply.text.clone()));
        Ok(reply)
    }

    /// Generates after `prompt_ids` as they are (no template): `expanse generate --raw` and `send`.
    pub fn complete(&mut self, prompt_ids: &[u32], interrupt: &AtomicBool, on_text: &mut dyn FnMut(&str)) -> Result<Reply> {
        let tok = &self.prompter.tokenizer;
        let mut sampler = Sampler::new(self.sampling.clone()).with_constraint(self.constraint.clone());
        // The grammar ends a constrained answer; a stop string would cut it short of parsing.
        let stops = if self.constraint.is_some() { Vec::new() } else { self.prompter.stop_strings.clone() };
        let mut stream = TextStream::new(tok, stops);
        let mut failure = None;
        let delay = self.decode_delay;
        let stats = generate(&mut self.generator, prompt_ids, &mut sampler, self.max_tokens.unwrap_or(usize::MAX), &self.prompter.stop_ids, |id| {
            match stream.push(id) {
                Ok(piece) if !piece.is_empty() => on_text(&piece),
                Ok(_) => {}
                Err(e) => {
                    failure = Some(e);
                    return ControlFlow::Break(StopReason::Interrupted);
                }
            }
            if stream.stopped() {
                return ControlFlow::Break(StopReason::StopString);
            }
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            if interrupt.swap(false, Ordering::SeqCst) {
                return ControlFlow::Break(StopReason::Interrupted);
            }
            ControlFlow::Continue(())
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        self.answers += 1;
        self.generated_total += stats.generated.len();
        self.last = Some(stats.clone());
        Ok(Reply { text: stream.text().to_string(), stats, dropped: 0, prompt_ids: prompt_ids.to_vec() })
    }

    /// Writes the conversation as JSON, staged beside `path` and renamed into place, so an
    /// interrupted save never leaves half a file; a file the chat reads (`inputs`) is refused.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::json!({ "messages": self.messages, "sampling": self.sampling });
        let text = serde_json::to_string_pretty(&json).map_err(|e| Error::bad_file(path, e))?;
        let target = Target::check(path, "/save", OutKind::File, true, &self.inputs)?;
        // Replacing an earlier save is a save's point; any other file is the user's.
        if path.exists() && !is_saved_conversation(path) {
            return Err(Error::flag("/save", format!("{} exists and is not a conversation /save wrote; choose another name or remove it", path.display())));
        }
        let staging = Staging::create(&target)?;
        let tmp = staging.out();
        std::fs::write(&tmp, text + "\n").map_err(|e| staging.user_error(Error::io(&tmp, e)))?;
        staging.commit()
    }

    /// Replaces the conversation with a `/save` file (or a bare `[{"role", "content"}]` list). The
    /// cache is kept: the next turn re-runs only where the loaded conversation differs from it.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.messages = read_conversation(path)?;
        Ok(())
    }
}

/// Messages of a conversation file, checked: known roles, string contents.
pub fn read_conversation(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
    let list = match &v {
        serde_json::Value::Array(_) => &v,
        _ => v.get("messages").ok_or_else(|| Error::bad_file(path, "expected {\"messages\": [...]} or a list of messages"))?,
    };
    let messages: Vec<Message> =
        serde_json::from_value(list.clone()).map_err(|e| Error::bad_file(path, format!("messages must be {{\"role\", \"content\"}} objects: {e}")))?;
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(Error::bad_file(path, format!("message {i}: unknown role `{}` (system, user, assistant)", m.role)));
        }
    }
    Ok(messages)
}

fn check_ctx(ctx: Option<usize>, model: &Model) -> Result<usize> {
    let max = model.config.max_position_embeddings;
    let n = match ctx {
        None => max,
        Some(0) => return Err(Error::flag("--ctx", "must be at least 1")),
        Some(n) if n > max => return Err(Error::flag("--ctx", format!("{n} exceeds the model's max_position_embeddings {max}"))),
        Some(n) => n,
    };
    crate::engine::check_cache_fits(model, n)?;
    Ok(n)
}

/// What `chat` and `generate` share beyond the model flags.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub system: Option<String>,
    /// `--chat-template`: a file, `openchat` or `none`.
    pub template: Option<String>,
    pub stops: Vec<String>,
    pub max_tokens: Option<usize>,
    pub ctx: Option<usize>,
    pub sampling: SamplingParams,
    pub show_prompt: bool,
    pub color: bool,
    pub decode_delay: Duration,
    /// `--decode-path` (and the step's test options).
    pub decode: DecodeOptions,
    /// `--json-schema` / `--json-schema-file`: the grammar every answer follows.
    pub grammar: Option<Grammar>,
}

/// `12 tokens · first token 35 ms · 48.2 tok/s`
pub fn stats_line(s: &GenerationStats) -> String {
    let mut line = format!("{} tokens · first token {:.0} ms · {:.1} tok/s", s.generated.len(), s.time_to_first_token_secs * 1e3, s.decode_tps());
    match s.stop {
        StopReason::Interrupted => line.push_str(" · interrupted"),
        StopReason::ContextFull => line.push_str(" · context full"),
        StopReason::MaxTokens => line.push_str(" · max tokens"),
        StopReason::Eos | StopReason::StopString => {}
    }
    line.push_str(&format!(" · decode path: {}", s.decode_path.as_str()));
    if let Some(tier) = s.cpu_kernels {
        line.push_str(&format!(" · cpu kernels: {tier}"));
    }
    if s.self_check_secs >= 0.0005 {
        line.push_str(&format!(" · fast path built and self-checked in {:.0} ms (once per process)", s.self_check_secs * 1e3));
    }
    line
}

/// An answer is being generated: Ctrl-C stops it (sets `INTERRUPT`) instead of ending the process.
pub(crate) static GENERATING: AtomicBool = AtomicBool::new(false);
/// Ctrl-C asked the answer under way to stop: the `interrupt` chat and generate hand to
/// `Session::send` and `Session::complete`.
pub(crate) static INTERRUPT: AtomicBool = AtomicBool::new(false);
/// The terminal REPL is running: at its prompt Ctrl-C is a key (raw mode), so a SIGINT can only
/// mean "stop the answer", even if it lands just before the answer starts.
static INTERACTIVE: AtomicBool = AtomicBool::new(false);

/// The terminal REPL tells the Ctrl-C handler whether it reads a terminal (see `INTERACTIVE`).
pub(crate) fn set_interactive(on: bool) {
    INTERACTIVE.store(on, Ordering::SeqCst);
}

/// Ctrl-C during a generation stops the answer; elsewhere (loading, a piped chat) it exits as usual.
pub(crate) fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) || INTERACTIVE.load(Ordering::SeqCst) {
            INTERRUPT.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    })
    .map_err(|e| Error::io("<Ctrl-C handler>", std::io::Error::other(e.to_string())))
}

/// Whether `path` holds what [`Session::save`] writes (a JSON object with a `messages` list).
fn is_saved_conversation(path: &Path) -> bool {
    let Ok(text) = crate::config::read_text(path) else { return false };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v.get("messages").is_some_and(serde_json::Value::is_array))
}
