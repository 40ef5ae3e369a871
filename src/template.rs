//! Chat prompts: a checkpoint's Jinja `chat_template` rendered the way transformers'
//! `apply_chat_template` renders it, the built-in OpenChat fallback, and raw (template-less) prompts.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// One turn of a conversation, in the shape chat templates and `/save` files use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// The speaker's name (OpenAI's `name`): handed to the template as `message.name`, as
    /// transformers hands it; templates that do not read it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant's function calls (`[{id, type, function: {name, arguments}}]`, the arguments
    /// parsed), for templates that render them (`serve::tools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// A `tool` message's answer to this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message { role: role.into(), content: content.into(), name: None, tool_calls: None, tool_call_id: None }
    }
    pub fn system(content: impl Into<String>) -> Message {
        Message::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new("assistant", content)
    }
}

/// OpenChat 3.5's template, verbatim from openchat/openchat-3.5-0106's tokenizer_config.json.
pub const OPENCHAT: &str = "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': ' + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}";

/// What the tokenizer_config.json says that matters for prompting.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// Special tokens are either plain strings or AddedToken objects (`{"content": "<s>", ...}`).
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TokenizerConfig {
    /// A tokenizer_config.json, or the keys a GGUF file's metadata holds for it.
    pub fn from_file(path: &Path) -> Result<TokenizerConfig> {
        if crate::quant::gguf::is_gguf_path(path) {
            let vocab = crate::quant::gguf::GgufFile::open(path)?.vocab()?;
            return TokenizerConfig::from_json(&crate::tokenizer::gguf::tokenizer_config_json(&vocab).to_string(), path);
        }
        let text = crate::config::read_text(path)?;
        TokenizerConfig::from_json(&text, path)
    }

    /// Parses tokenizer_config.json text; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<TokenizerConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(Error::bad_file(path, "expected a JSON object"));
        }
        // transformers also accepts a list of named templates; "default" is the one it picks.
        let chat_template = match v.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            Some(Value::Null) | None => None,
            Some(_) => return Err(Error::bad_file(path, "`chat_template` must be a string or a list of {name, template}")),
        };
        Ok(TokenizerConfig {
            chat_template,
            bos_token: token_text(v.get("bos_token")),
            eos_token: token_text(v.get("eos_token")),
            unk_token: token_text(v.get("unk_token")),
            pad_token: token_text(v.get("pad_token")),
        })
    }
}

/// Where the template came from, for `--show-prompt` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    Checkpoint(PathBuf),
    File(PathBuf),
    BuiltinOpenChat,
    /// `--chat-template none` / `generate --raw`: BOS, then the messages' text as is.
    Raw,
}

impl std::fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateOrigin::Checkpoint(p) => write!(f, "{}", p.display()),
            TemplateOrigin::File(p) => write!(f, "{}", p.display()),
            TemplateOrigin::BuiltinOpenChat => f.write_str("built-in OpenChat"),
            TemplateOrigin::Raw => f.write_str("none (raw)"),
        }
    }
}

pub struct ChatTemplate {
    source: Option<String>,
    pub origin: TemplateOrigin,
    pub special: TokenizerConfig,
    /// Most bytes a rendered prompt may have: a template may loop its way to hundreds of MB.
    output_limit: usize,
}

/// What one render may spend. Chat templates are code from the checkpoint (or a file) that loops and
/// builds strings: without a bound, two nested `range(100000)` loops run for hours, and a string
/// doubled in a loop takes all memory, since minijinja's `~`, `+` and `*` allocate without a check
/// (it caps only `*` at 100 MB). Real templates take a few hundred steps and a few copies of the
/// messages per message, far below either budget.
struct RenderBudget {
    /// minijinja's fuel: about one per instruction run (30 million a second).
    steps: u64,
    /// Bytes the rendering thread may hold at once (`crate::budget`).
    bytes: usize,
}

impl RenderBudget {
    /// Ten million steps and 256 MiB, plus 16 steps and 16 bytes per byte of the messages (their calls
    /// and the tools list included), for
    /// templates that walk their text character by character or copy it several times.
    fn for_messages(messages: &[Message], tools: Option<&Value>) -> RenderBudget {
        let calls = |m: &Message| m.tool_calls.as_ref().map_or(0, |c| c.to_string().len());
        let listed = tools.map_or(0, |t| t.to_string().len());
        let input: usize = messages.iter().map(|m| m.role.len() + m.content.len() + calls(m)).sum::<usize>() + listed;
        RenderBudget {
            steps: 10_000_000u64.saturating_add((input as u64).saturating_mul(16)),
            bytes: (256usize << 20).saturating_add(input.saturating_mul(16)),
        }
    }
}

/// An `io::Write` into memory that refuses to grow past `limit` bytes.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("prompt too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a rendered conversation ends with after its last message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The assistant's turn opened (`add_generation_prompt`).
    Open,
    /// Nothing (`add_generation_prompt: false`).
    Closed,
    /// The final message left open, to be continued (llama-server's assistant prefill; vLLM's
    /// `continue_final_message`).
    Continue,
}

impl ChatTemplate {
    /// The template `--chat-template` asks for (a file, `openchat` or `none`), else the checkpoint's
    /// (`chat_template.jinja` beside it, then tokenizer_config.json), else the built-in OpenChat one.
    pub fn resolve(spec: Option<&str>, model_dir: Option<&Path>, tokenizer_config: Option<&Path>) -> Result<ChatTemplate> {
        let special = match tokenizer_config {
            Some(p) => TokenizerConfig::from_file(p)?,
            None => TokenizerConfig::default(),
        };
        let (source, origin) = match spec {
            Some("openchat") => (Some(OPENCHAT.to_string()), TemplateOrigin::BuiltinOpenChat),
            Some("none") | Some("raw") => (None, TemplateOrigin::Raw),
            Some("") => return Err(Error::flag("--chat-template", "is empty: expected a Jinja file, `openchat` or `none`")),
            Some(file) => {
                let path = PathBuf::from(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::flag("--chat-template", format!("{}: {e} (expected a Jinja file, `openchat` or `none`)", path.display())))?;
                (Some(text), TemplateOrigin::File(path))
            }
            None => {
                let jinja = model_dir.map(|d| d.join("chat_template.jinja")).filter(|p| p.is_file());
                if let Some(p) = jinja {
                    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                    (Some(text), TemplateOrigin::Checkpoint(p))
                } else if let (Some(t), Some(p)) = (&special.chat_template, tokenizer_config) {
                    (Some(t.clone()), TemplateOrigin::Checkpoint(p.to_path_buf()))
                } else {
                    (Some(OPENCHAT.to_string()), TemplateOrigin::BuiltinOpenChat)
                }
            }
        };
        if source.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(Error::template("the template is empty", Some(&origin)));
        }
        let t = ChatTemplate { source, origin, special, output_limit: usize::MAX };
        // Compile once up front so a broken template is reported at start-up, naming its origin.
        if let Some(src) = &t.source {
            t.env(src, None)?;
        }
        Ok(t)
    }

    /// A template from text, with explicit special tokens (tests, embedding).
    pub fn from_source(source: &str, special: TokenizerConfig) -> Result<ChatTemplate> {
        if source.trim().is_empty() {
            return Err(Error::template("the template is empty", None));
        }
        let t = ChatTemplate { source: Some(source.to_string()), origin: TemplateOrigin::BuiltinOpenChat, special, output_limit: usize::MAX };
        t.env(source, None)?;
        Ok(t)
    }

    /// Refuse to render prompts longer than `bytes` (what the context can hold at most).
    pub fn set_output_limit(&mut self, bytes: usize) {
        self.output_limit = bytes;
    }

    /// The error of a prompt that renders past the output limit.
    pub(crate) fn too_long(&self) -> Error {
        Error::PromptTooLong { limit: self.output_limit, origin: Some(self.origin.to_string()) }
    }

    pub fn is_raw(&self) -> bool {
        self.source.is_none()
    }

    /// The environment that compiles (and, given `steps`, runs at most that many steps of) `source`.
    fn env<'s>(&self, source: &'s str, steps: Option<u64>) -> Result<minijinja::Environment<'s>> {
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the
        // loopcontrols extension, `raise_exception` as a global, and Python string methods
        // (`.title()`, `.strip()`) that Jinja2 templates call freely.
        let mut env = minijinja::Environment::new();
        env.set_fuel(steps);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        // transformers' global: Llama 3.2's template dates its system header with it.
        env.add_function("strftime_now", |format: String| strftime(&chrono::Local::now(), &format));
        env.add_template("chat", source).map_err(|e| self.error(e))?;
        Ok(env)
    }

    fn error(&self, e: minijinja::Error) -> Error {
        // raise_exception's message is what the template author wrote for the user: show it alone.
        let msg = match (e.kind(), e.detail()) {
            (minijinja::ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
            _ => e.to_string(),
        };
        Error::template(msg, Some(&self.origin))
    }

    /// The prompt text for `messages`, ending as `ending` says. `Continue` leaves the last message (an
    /// assistant's partial answer) open: the text stops right after its content, before the
    /// template's end of turn, so that the model continues it (vLLM cuts its rendering the same way).
    pub fn render_ending(&self, messages: &[Message], ending: Ending) -> Result<String> {
        self.render_with_tools(messages, ending, None)
    }

    /// Whether the template reads the `tools` variable (renders functions itself).
    pub fn renders_tools(&self) -> bool {
        self.source.as_deref().is_some_and(|s| s.contains("tools"))
    }

    /// [`render_ending`](Self::render_ending) with `tools` (the request's list) handed to the
    /// template as transformers' `apply_chat_template(tools=…)` does.
    pub fn render_with_tools(&self, messages: &[Message], ending: Ending, tools: Option<&Value>) -> Result<String> {
        const MARK: &str = "\u{1}expanse-continue\u{1}";
        match ending {
            Ending::Open => self.render_tools(messages, true, tools),
            Ending::Closed => self.render_tools(messages, false, tools),
            Ending::Continue if self.is_raw() => self.render_tools(messages, false, tools),
            Ending::Continue => {
                let mut marked = messages.to_vec();
                if let Some(last) = marked.last_mut() {
                    last.content.push_str(MARK);
                }
                let text = self.render_tools(&marked, false, tools)?;
                let at = text.rfind(MARK).ok_or_else(|| {
                    Error::template("the template does not write the final message's text as given, so it cannot be continued", Some(&self.origin))
                })?;
                Ok(text[..at].to_string())
            }
        }
    }

    /// The prompt text for `messages`; `add_generation_prompt` opens the assistant's turn. Rendering
    /// runs under a budget of steps and of memory that grows with the messages (see `RenderBudget`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_tools(messages, add_generation_prompt, None)
    }

    fn render_tools(&self, messages: &[Message], add_generation_prompt: bool, tools: Option<&Value>) -> Result<String> {
        let Some(src) = &self.source else {
            let body: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            // No BOS in the text: a raw prompt gets one only where the tokenizer's own rules add it
            // (`Prompter::encode`), as transformers tokenizes it.
            let text = body.join("\n");
            return if text.len() > self.output_limit { Err(self.too_long()) } else { Ok(text) };
        };
        let budget = RenderBudget::for_messages(messages, tools);
        let env = self.env(src, Some(budget.steps))?;
        let tmpl = env.get_template("chat").map_err(|e| self.error(e))?;
        let s = &self.special;
        let mut out = Bounded { text: Vec::new(), limit: self.output_limit, overflowed: false };
        let memory = crate::budget::open(budget.bytes, &self.over_memory(budget.bytes));
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => s.bos_token.as_deref().unwrap_or(""),
                eos_token => s.eos_token.as_deref().unwrap_or(""),
                unk_token => s.unk_token.as_deref().unwrap_or(""),
                pad_token => s.pad_token.as_deref().unwrap_or(""),
                tools => tools.map_or(minijinja::Value::from(()), minijinja::Value::from_serialize),
                documents => minijinja::Value::from(()),
            },
            &mut out,
        );
        drop(memory);
        match rendered {
            Ok(_) => String::from_utf8(out.text).map_err(|e| Error::template(e, Some(&self.origin))),
            Err(_) if out.overflowed => Err(self.too_long()),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::template(
                format!("rendering took more than {} steps, the budget for these messages: an endless loop?", budget.steps),
                Some(&self.origin),
            )),
            Err(e) => Err(self.error(e)),
        }
    }

    /// The line the memory budget ends the process with (it cannot return an error from inside an
    /// allocation: see `crate::budget`).
    fn over_memory(&self, bytes: usize) -> String {
        let mib = bytes >> 20;
        format!("chat template: rendering needed more than {mib} MiB of memory, the budget for these messages ({})", self.origin)
    }

    /// The text a template puts right after an assistant message (`<|end_of_turn|>` for OpenChat,
    /// `<|im_end|>\n` for ChatML): the model ends its turn by generating it.
    pub fn turn_suffix(&self) -> Option<String> {
        const MARK: &str = "\u{1}expanse-answer\u{1}";
        self.source.as_ref()?;
        let msgs = [Message::user("hi"), Message::assistant(MARK)];
        let text = self.render(&msgs, false).ok()?;
        let after = &text[text.find(MARK)? + MARK.len()..];
        let after = after.trim_start();
        (!after.is_empty()).then(|| after.to_string())
    }
}

/// `time` in strftime's syntax (Python's, as transformers' `strftime_now` formats); a format chrono
/// cannot read is a template error, not a panic.
fn strftime<Tz: chrono::TimeZone>(time: &chrono::DateTime<Tz>, format: &str) -> std::result::Result<String, minijinja::Error>
where
    Tz::Offset: std::fmt::Display,
{
    let items = chrono::format::StrftimeItems::new(format)
        .parse()
        .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("strftime_now: the format {format:?} is not one strftime reads")))?;
    Ok(time.format_with_items(items.iter()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template that renders tools gets the request's list as `tools` and each message's calls
    /// (arguments parsed) and call ids, as transformers hands them.
    #[test]
    fn tools_and_calls_reach_a_template_that_renders_them() {
        let src = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}\
                   {% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments.city }}</call>{% endfor %}\
                   {% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{% endfor %}";
        let t = ChatTemplate::from_source(src, TokenizerConfig::default()).unwrap();
        assert!(t.renders_tools() && !openchat().renders_tools());
        let tools = serde_json::json!([{ "type": "function", "function": { "name": "get_weather" } }]);
        let call = serde_json::json!([{ "id": "c1", "type": "function", "function": { "name": "get_weather", "arguments": { "city": "Paris" } } }]);
        let messages = [
            Message::user("Weather?"),
            Message { tool_calls: Some(call), ..Message::assistant("") },
            Message { tool_call_id: Some("c1".into()), ..Message::new("tool", "18 C") },
        ];
        let text = t.render_with_tools(&messages, Ending::Closed, Some(&tools)).unwrap();
        assert_eq!(
            text,
            r#"<tools>[{"type":"function","function":{"name":"get_weather"}}]</tools><user>Weather?<assistant><call>get_weather Paris</call><tool>18 C[c1]"#
        );
        assert!(!t.render(&messages, false).unwrap().contains("<tools>"), "no tools, none rendered");
    }

    fn openchat() -> ChatTemplate {
        let special = TokenizerConfig { bos_token: Some("<s>".into()), eos_token: Some("<|end_of_turn|>".into()), ..Default::default() };
        ChatTemplate::from_source(OPENCHAT, special).unwrap()
    }

    #[test]
    fn trims_blocks_like_transformers() {
        // With trim_blocks/lstrip_blocks the newline after a block tag and the indentation before it vanish.
        let t = ChatTemplate::from_source("{% for m in messages %}\n  {{ m.content }}\n{% endfor %}", TokenizerConfig::default()).unwrap();
        assert_eq!(t.render(&[Message::user("a"), Message::user("b")], false).unwrap(), "  a\n  b\n");
    }

    /// strftime's syntax as Python writes it (Llama 3.2 asks for `%d %b %Y`); a format chrono cannot
    /// read fails the render with a message, never a panic.
    #[test]
    fn strftime_now_formats_as_python_does() {
        use chrono::TimeZone;
        let t = chrono::Utc.with_ymd_and_hms(2024, 7, 6, 9, 5, 0).unwrap();
        assert_eq!(strftime(&t, "%d %b %Y").unwrap(), "06 Jul 2024");
        assert_eq!(strftime(&t, "%Y-%m-%d %H:%M, %A %B").unwrap(), "2024-07-06 09:05, Saturday July");
        let e = strftime(&t, "%Q").unwrap_err().to_string();
        assert!(e.contains("\"%Q\""), "{e}");
        let special = TokenizerConfig::default();
        let t = ChatTemplate::from_source("{{ strftime_now('%Q') }}", special).unwrap();
        let e = t.render(&[Message::user("hi")], true).unwrap_err().to_string();
        assert!(e.contains("strftime_now") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok";
        let t = ChatTemplate::from_source(src, TokenizerConfig::default()).unwrap();
        let err = t.render(&[Message::system("x")], true).unwrap_err().to_string();
        assert!(err.starts_with("chat template: System role not supported"), "{err}");
        assert_eq!(t.render(&[Message::user("x")], true).unwrap(), "ok");
    }

    #[test]
    fn openchat_turn_suffix_and_system_role() {
        let t = openchat();
        assert_eq!(t.turn_suffix().as_deref(), Some("<|end_of_turn|>"));
        let text = t.render(&[Message::system("Be brief."), Message::user("Hi")], true).unwrap();
        assert_eq!(text, "<s>GPT4 Correct System: Be brief.<|end_of_turn|>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant:");
    }

    /// A continued final message ends the text: no end of turn, no new assistant turn.
    #[test]
    fn a_final_message_is_continued_where_its_text_ends() {
        let t = openchat();
        let msgs = [Message::user("Hi"), Message::assistant("The answer is")];
        let open = "<s>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: The answer is";
        assert_eq!(t.render_ending(&msgs, Ending::Continue).unwrap(), open);
        assert_eq!(t.render_ending(&msgs, Ending::Closed).unwrap(), format!("{open}<|end_of_turn|>"));
        assert_eq!(t.render_ending(&msgs[..1], Ending::Open).unwrap(), t.render(&msgs[..1], true).unwrap());
        // A template that does not write the content as given cannot be continued.
        let upper = ChatTemplate::from_source("{% for m in messages %}{{ m.content | upper }}{% endfor %}", TokenizerConfig::default()).unwrap();
        assert!(upper.render_ending(&msgs, Ending::Continue).unwrap_err().to_string().contains("continued"));
    }

    #[test]
    fn a_template_that_loops_stops_at_its_step_budget() {
        // 3·10⁷ loop steps and nothing written: the output limit never trips, the step budget does.
        let src = "{% for i in range(100000) %}{% for j in range(300) %}{% endfor %}{% endfor %}ok";
        let t = ChatTemplate::from_source(src, TokenizerConfig::default()).unwrap();
        let err = t.render(&[Message::user("x")], true).unwrap_err().to_string();
        assert!(err.starts_with("chat template: ") && err.contains("steps"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_at_load() {
        assert!(ChatTemplate::from_source("{% for %}", TokenizerConfig::default()).is_err());
    }
}
