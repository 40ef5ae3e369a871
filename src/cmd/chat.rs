//! `expanse chat`: the terminal REPL over a conversation — line editing and history, `/commands`,
//! answers streamed as they come; one answer per stdin line when piped.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use clap::Args;

use super::args::{DecodeArgs, GenArgs, ModelArgs, SkipArgs};
use super::Failure;
use crate::conversation::{describe_prompt, install_interrupt_handler, set_interactive, stats_line, ChatOptions, Prompter, Session, GENERATING, INTERRUPT};
use crate::engine::{LoadOptions, Loaded};
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub(super) model: ModelArgs,
    #[command(flatten)]
    skip: SkipArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    #[command(flatten)]
    gen: GenArgs,
}

/// `expanse chat`
pub fn run(args: ChatArgs) -> Result<(), Failure> {
    let ChatArgs { model, skip, decode, gen } = args;
    // Flags are checked before the (slow) weights load.
    let source = model.source.checkpoint.open()?;
    let opts = gen.options(&source, &decode)?;
    let style = Style { color: opts.color };
    let loaded = load_with_summary(&model.options(skip.skip_transparent), style)?;
    repl(&loaded, &opts)?;
    Ok(())
}

/// ANSI styling, only when writing to a terminal and `NO_COLOR`/`--no-color` are absent.
#[derive(Clone, Copy)]
struct Style {
    color: bool,
}

impl Style {
    fn dim(&self, s: &str) -> String {
        if self.color {
            format!("\x1b[2m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(&self, s: &str) -> String {
        if self.color {
            format!("\x1b[1;32m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

/// Loads (with a byte bar on a terminal), then prints the notices and the summary.
fn load_with_summary(opts: &LoadOptions, style: Style) -> Result<Loaded> {
    let loaded = crate::engine::load(opts)?;
    for n in &loaded.notices {
        eprintln!("{}", style.dim(n));
    }
    eprintln!("{}", style.dim(&loaded.summary()));
    Ok(loaded)
}

const HELP: &str = "\
/help                 this help
/reset                new conversation (system message kept, cache cleared)
/system TEXT          set the system message (no TEXT: clear it)
/set KEY VALUE        temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                      frequency_penalty, presence_penalty, seed, max_tokens
/stats                speed of the last answer and context used
/save FILE            write the conversation as JSON
/load FILE            read a conversation written by /save
/paste … /end         multi-line input (or end a line with \\)
/quit                 exit (also Ctrl-D, or Ctrl-C at an empty prompt)
Ctrl-C while answering stops the answer and keeps what was written.";

/// Where the REPL's lines come from: an editor on a terminal, plain lines from a pipe.
enum Input {
    Editor(Box<rustyline::Editor<(), rustyline::history::FileHistory>>, Option<PathBuf>),
    Pipe(std::io::Lines<std::io::StdinLock<'static>>),
}

/// Ctrl-C with text on the line clears it, like a shell; on an empty line it ends the chat.
struct CtrlC;

impl rustyline::ConditionalEventHandler for CtrlC {
    fn handle(&self, _: &rustyline::Event, _: rustyline::RepeatCount, _: bool, ctx: &rustyline::EventContext) -> Option<rustyline::Cmd> {
        if ctx.line().is_empty() {
            Some(rustyline::Cmd::Interrupt)
        } else {
            Some(rustyline::Cmd::Kill(rustyline::Movement::WholeBuffer))
        }
    }
}

fn history_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EXPANSE_HISTORY") {
        return Some(PathBuf::from(p));
    }
    let state = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("expanse/chat_history"))
}

impl Input {
    /// `reads`: what the chat reads, which the history file may not be.
    fn open(reads: &[PathBuf]) -> Result<Input> {
        if !std::io::stdin().is_terminal() {
            return Ok(Input::Pipe(std::io::stdin().lock().lines()));
        }
        let config = rustyline::Config::builder().auto_add_history(false).max_history_size(2000).map_err(readline_error)?.build();
        let mut ed = rustyline::Editor::<(), rustyline::history::FileHistory>::with_config(config).map_err(readline_error)?;
        ed.bind_sequence(rustyline::KeyEvent::ctrl('C'), rustyline::EventHandler::Conditional(Box::new(CtrlC)));
        let hist = history_path().filter(|p| match crate::staging::clash(p, reads) {
            Some(how) => {
                eprintln!("note: no chat history: {} {how}, which this chat reads", p.display());
                false
            }
            None => true,
        });
        if let Some(p) = &hist {
            // A missing history file is the normal first run.
            let _ = ed.load_history(p);
        }
        Ok(Input::Editor(Box::new(ed), hist))
    }

    /// The next line, or None at end of input (Ctrl-D, Ctrl-C on an empty line, end of the pipe).
    fn line(&mut self, prompt: &str) -> Result<Option<String>> {
        match self {
            Input::Pipe(lines) => match lines.next() {
                None => Ok(None),
                Some(l) => l.map(Some).map_err(|e| Error::io("<stdin>", e)),
            },
            Input::Editor(ed, _) => match ed.readline(prompt) {
                Ok(l) => Ok(Some(l)),
                Err(rustyline::error::ReadlineError::Eof | rustyline::error::ReadlineError::Interrupted) => Ok(None),
                Err(e) => Err(readline_error(e)),
            },
        }
    }

    /// A whole user input: `\`-continued lines and `/paste` … `/end` blocks joined by newlines.
    fn entry(&mut self, style: Style) -> Result<Option<String>> {
        let prompt = style.bold(">>> ");
        let Some(first) = self.line(&prompt)? else { return Ok(None) };
        let mut text = String::new();
        if first.trim() == "/paste" {
            while let Some(l) = self.line("")? {
                if l.trim() == "/end" {
                    break;
                }
                text.push_str(&l);
                text.push('\n');
            }
            let text = text.trim_end_matches('\n').to_string();
            self.remember(&text);
            return Ok(Some(text));
        }
        let mut line = first;
        while let Some(stripped) = line.strip_suffix('\\') {
            text.push_str(stripped);
            text.push('\n');
            match self.line(&style.bold("... "))? {
                Some(l) => line = l,
                None => {
                    line = String::new();
                    break;
                }
            }
        }
        text.push_str(&line);
        self.remember(&text);
        Ok(Some(text))
    }

    fn remember(&mut self, entry: &str) {
        if let Input::Editor(ed, path) = self {
            if !entry.trim().is_empty() {
                let _ = ed.add_history_entry(entry);
                if let Some(p) = path {
                    if let Some(dir) = p.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    // History is a convenience: an unwritable file must not end the chat.
                    let _ = ed.append_history(p);
                }
            }
        }
    }

    fn interactive(&self) -> bool {
        matches!(self, Input::Editor(..))
    }
}

fn readline_error(e: impl std::fmt::Display) -> Error {
    Error::io("<terminal>", std::io::Error::other(e.to_string()))
}

/// The REPL on a terminal, or one answer per stdin line when piped.
fn repl(loaded: &Loaded, opts: &ChatOptions) -> Result<()> {
    let style = Style { color: opts.color };
    let prompter = Prompter::for_source(&loaded.source, opts.template.as_deref(), &opts.stops)?;
    let mut session = Session::with_decode(&loaded.model, &prompter, opts.ctx, opts.sampling.clone(), &opts.decode)?;
    session.max_tokens = opts.max_tokens;
    session.decode_delay = opts.decode_delay;
    session.constrain(opts.grammar.as_ref(), "--json-schema")?;
    session.set_system(opts.system.as_deref());
    let reads = chat_inputs(loaded, opts);
    // Render once now so a template that cannot render this conversation fails before the first turn.
    session.preview("Hello")?;
    install_interrupt_handler()?;
    let mut input = Input::open(&reads)?;
    // `/save` must not write over the history either.
    session.inputs = reads.into_iter().chain(history_path().and_then(|p| p.canonicalize().ok())).collect();
    set_interactive(input.interactive());
    if input.interactive() {
        eprintln!(
            "{}",
            style.dim(&format!(
                "template: {} · context {} tokens · decode path: {} · /help for commands, Ctrl-D to quit",
                prompter.template.origin,
                session.context(),
                session.decode_path().as_str()
            ))
        );
    }
    while let Some(entry) = input.entry(style)? {
        let trimmed = entry.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with('/') && !trimmed.starts_with("//") {
            match command(&mut session, trimmed, style) {
                ControlFlow::Break(()) => break,
                ControlFlow::Continue(()) => continue,
            }
        }
        // `//text` sends a message that starts with a slash.
        let text = entry.strip_prefix('/').filter(|_| trimmed.starts_with("//")).unwrap_or(&entry);
        turn(&mut session, text, opts, style)?;
    }
    Ok(())
}

/// What the chat reads, which neither `/save` nor the history may write over: the model's files,
/// the expansion YAML and a `--chat-template` file.
fn chat_inputs(loaded: &Loaded, opts: &ChatOptions) -> Vec<PathBuf> {
    let mut inputs = loaded.source.input_paths(&loaded.plan.spec);
    let template = opts.template.as_deref().filter(|t| !matches!(*t, "openchat" | "none" | "raw")).map(PathBuf::from);
    inputs.extend(template.and_then(|p| p.canonicalize().ok()));
    inputs
}

/// One answer, streamed; errors about the input are reported and the chat goes on.
fn turn(session: &mut Session, text: &str, opts: &ChatOptions, style: Style) -> Result<()> {
    if opts.show_prompt {
        match session.preview(text) {
            Ok((p, ids)) => eprintln!("{}", style.dim(&describe_prompt(&p, &ids))),
            Err(e) => eprintln!("error: {e}"),
        }
    }
    let mut out = std::io::stdout().lock();
    GENERATING.store(true, Ordering::SeqCst);
    let result = session.send(text, &INTERRUPT, &mut |piece| {
        // A closed stdout (`| head`) is not worth failing the generation for.
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    });
    GENERATING.store(false, Ordering::SeqCst);
    // A Ctrl-C that came after the last token must not stop the next answer.
    INTERRUPT.store(false, Ordering::SeqCst);
    let _ = writeln!(out);
    let _ = out.flush();
    drop(out);
    match result {
        Ok(reply) => {
            if reply.dropped > 0 {
                eprintln!(
                    "{}",
                    style.dim(&format!(
                        "(dropped the {} oldest messages to fit the context of {} tokens; re-ran {} prompt tokens)",
                        reply.dropped,
                        session.context(),
                        reply.stats.prefilled_tokens
                    ))
                );
            }
            eprintln!("{}", style.dim(&stats_line(&reply.stats)));
            Ok(())
        }
        Err(e @ (Error::Template { .. } | Error::PromptTooLong { .. } | Error::ContextTooSmall { .. } | Error::Tokenizer { .. })) => {
            eprintln!("error: {e}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Runs a `/command`; Break ends the chat.
fn command(session: &mut Session, line: &str, style: Style) -> ControlFlow<()> {
    let (name, arg) = match line.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (line, ""),
    };
    match name {
        "/quit" | "/exit" | "/bye" => return ControlFlow::Break(()),
        "/help" | "/?" => eprintln!("{HELP}"),
        "/reset" | "/clear" => {
            session.reset();
            eprintln!("{}", style.dim("(new conversation)"));
        }
        "/system" => {
            session.set_system(Some(arg).filter(|a| !a.is_empty()));
            let msg = if arg.is_empty() { "(system message cleared)".to_string() } else { format!("(system: {arg})") };
            eprintln!("{}", style.dim(&msg));
        }
        "/set" => {
            let mut parts = arg.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some("max_tokens"), Some(v), None) => match v.parse::<usize>() {
                    Ok(n) => session.max_tokens = (n > 0).then_some(n),
                    Err(_) => eprintln!("error: max_tokens: `{v}` is not a whole number"),
                },
                (Some(k), Some(v), None) => match session.sampling.set(k, v) {
                    Ok(()) => eprintln!("{}", style.dim(&format!("({k} = {v})"))),
                    Err(e) => eprintln!("error: {e}"),
                },
                _ => eprintln!("usage: /set KEY VALUE (current: {})", describe_sampling(&session.sampling)),
            }
        }
        "/stats" => eprintln!("{}", stats_report(session)),
        "/save" | "/load" if arg.is_empty() => eprintln!("usage: {name} FILE"),
        "/save" => match session.save(Path::new(arg)) {
            Ok(()) => eprintln!("{}", style.dim(&format!("(saved {} messages to {arg})", session.messages.len()))),
            Err(e) => eprintln!("error: {e}"),
        },
        "/load" => match session.load(Path::new(arg)) {
            Ok(()) => eprintln!("{}", style.dim(&format!("(loaded {} messages from {arg})", session.messages.len()))),
            Err(e) => eprintln!("error: {e}"),
        },
        _ => eprintln!("unknown command {name} (/help lists them; start a message with // to send a literal /)"),
    }
    ControlFlow::Continue(())
}

fn describe_sampling(p: &SamplingParams) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "off".into());
    format!(
        "temperature {} · top_p {} · top_k {} · min_p {} · repeat_penalty {} (last {}) · frequency_penalty {} · presence_penalty {} · seed {}",
        p.temperature,
        opt(p.top_p.map(|v| v.to_string())),
        opt(p.top_k.map(|v| v.to_string())),
        opt(p.min_p.map(|v| v.to_string())),
        p.repeat_penalty,
        p.repeat_last_n,
        p.frequency_penalty,
        p.presence_penalty,
        p.seed
    )
}

fn stats_report(session: &Session) -> String {
    let used = session.context_used();
    let ctx = session.context();
    let mut lines = vec![format!("context: {used} / {ctx} tokens ({:.0}%)", 100.0 * used as f64 / ctx.max(1) as f64)];
    match &session.last {
        None => lines.push("no answer yet".into()),
        Some(s) => {
            lines.push(format!(
                "prompt: {} tokens, {} run ({} from the cache) at {:.1} tok/s",
                s.prompt_tokens,
                s.prefilled_tokens,
                s.prompt_tokens - s.prefilled_tokens,
                s.prefill_tps()
            ));
            lines.push(format!("time to first token: {:.0} ms", s.time_to_first_token_secs * 1e3));
            lines.push(format!("decode: {} tokens at {:.1} tok/s", s.generated.len(), s.decode_tps()));
        }
    }
    lines.push(format!("session: {} answers, {} tokens generated", session.answers, session.generated_total));
    lines.push(format!("sampling: {}", describe_sampling(&session.sampling)));
    lines.join("\n")
}
