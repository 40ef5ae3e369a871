//! The OpenAI wire format: request bodies checked field by field into a `Request`, and the
//! `chat.completion` / `text_completion` objects and their stream chunks.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::tools::{self, Tools};
use crate::constraint::Grammar;
use crate::generation::{StopReason, TokenLogprobs};
use crate::sampling::SamplingParams;
use crate::template::{Ending, Message};
use crate::tokenizer::Tokenizer;

/// Which endpoint a request came to: chat (messages through the template) or completions (raw text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What to generate after.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Messages(Vec<Message>),
    /// A completions request's prompts: one, or a list (one choice each, in order).
    Prompts(Vec<Prompt>),
}

/// One completions prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    /// Token ids (vLLM and llama-server take them), run as they are.
    Ids(Vec<u32>),
}

/// Most prompts one completions request may list, and most choices (`n`) per prompt: a request's
/// choices run one after another on the one worker, holding the queue for all of them.
pub const MAX_PROMPTS: usize = 8;
pub const MAX_N: usize = 8;
/// Most alternatives `top_logprobs` (chat) or `logprobs` (completions) may ask for, as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A list of token ids (`[1, 2, 3]`), or None when `v` is not one.
fn token_ids(v: &Value) -> Option<Vec<u32>> {
    let list = v.as_array().filter(|l| !l.is_empty())?;
    list.iter().map(|x| x.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
}

/// A request's fields, checked, with the server's defaults filled in for what it left out.
#[derive(Debug, Clone)]
pub struct Request {
    pub model: Option<String>,
    pub input: Input,
    /// `max_completion_tokens`, else `max_tokens`; None: until a stop, the context end or the cap.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Chat `logprobs: true` with `top_logprobs` (0 when absent), or completions' `logprobs: N`.
    pub logprobs: Option<usize>,
    /// Completions: the prompt's text (and with `logprobs` its tokens') before the answer.
    pub echo: bool,
    /// Choices per prompt (each with seed `seed + i`).
    pub n: usize,
    /// Chat: how the conversation's rendering ends.
    pub ending: Ending,
    /// `response_format`'s grammar (`json_object`, `json_schema`); None for text.
    pub format: Option<Grammar>,
    /// Chat: the functions the model may call (`tools`, `tool_choice`); None when it may call none.
    pub tools: Option<Tools>,
}

/// `response_format`: `text`, `json_object`, or `json_schema` with its `schema` (`name` and `strict`
/// are accepted; the answer always follows the schema, strict or not).
fn response_format(v: &Value) -> Result<Option<Grammar>, ApiError> {
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::json_object())),
        Some("json_schema") => {
            let schema = v.get("json_schema").and_then(|j| j.get("schema"));
            match schema {
                Some(s @ Value::Object(_)) => Ok(Some(Grammar::Json(s.clone()))),
                Some(Value::Bool(true)) => Ok(Some(Grammar::Json(json!({})))),
                _ => Err(ApiError::field("response_format.json_schema.schema", "`response_format.json_schema.schema` must be a JSON schema object")),
            }
        }
        _ => Err(ApiError::field("response_format", format!("`response_format.type` must be text, json_object or json_schema, got {v}"))),
    }
}

/// Fields common clients send that change nothing at the value given here; any other value is refused.
fn neutral(endpoint: Endpoint, key: &str, v: &Value) -> Option<bool> {
    let empty = |v: &Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty);
    Some(match key {
        // Bookkeeping for the caller, never read by the model.
        "user" | "metadata" | "store" | "service_tier" | "parallel_tool_calls" => true,
        "suffix" => v.is_null(),
        "echo" if endpoint == Endpoint::Chat => v == &Value::Bool(false),
        "functions" | "prediction" => empty(v),
        "function_call" => v.is_null() || v == "none" || v == "auto",
        "modalities" => v.is_null() || v == &json!(["text"]),
        "best_of" => v.is_null() || v.as_u64() == Some(1),
        _ => return None,
    })
}

fn number(key: &str, v: &Value) -> Result<f64, ApiError> {
    v.as_f64().ok_or_else(|| ApiError::field(key, format!("`{key}` must be a number, got {v}")))
}

fn count(key: &str, v: &Value) -> Result<u64, ApiError> {
    v.as_u64().ok_or_else(|| ApiError::field(key, format!("`{key}` must be a whole number ≥ 0, got {v}")))
}

fn set(sampling: &mut SamplingParams, key: &str, value: String) -> Result<(), ApiError> {
    sampling.set(key, &value).map_err(|e| ApiError::field(key, e))
}

/// `stop`: a string or a list of strings.
fn stops(v: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::field("stop", format!("`stop` must be a string or a list of strings, got {v}"));
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(list) => list.iter().map(|s| s.as_str().map(str::to_string).ok_or_else(bad)).collect(),
        _ => Err(bad()),
    }
}

/// `logit_bias`: `{"token id": bias}` with biases in [−100, 100], as OpenAI takes it. Ids are checked
/// against the vocabulary where the request is answered (`App::check_ids`).
fn logit_bias(v: &Value) -> Result<Vec<(u32, f32)>, ApiError> {
    let obj = v.as_object().ok_or_else(|| ApiError::field("logit_bias", format!("`logit_bias` must be an object of token id → bias, got {v}")))?;
    obj.iter()
        .map(|(k, b)| {
            let id: u32 = k.parse().map_err(|_| ApiError::field("logit_bias", format!("logit_bias: `{k}` is not a token id")))?;
            match b.as_f64() {
                Some(x) if (-100.0..=100.0).contains(&x) => Ok((id, x as f32)),
                _ => Err(ApiError::field("logit_bias", format!("logit_bias[{k}] must be a number in [-100, 100], got {b}"))),
            }
        })
        .collect()
}

fn stream_options(v: &Value) -> Result<bool, ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::field("stream_options", format!("`stream_options` must be an object, got {v}")));
    };
    let mut include_usage = false;
    for (k, x) in obj {
        match (k.as_str(), x) {
            ("include_usage", Value::Bool(b)) => include_usage = *b,
            ("include_obfuscation", Value::Bool(false) | Value::Null) => {}
            _ => return Err(ApiError::field(&format!("stream_options.{k}"), format!("`stream_options.{k}` = {x} is not supported"))),
        }
    }
    Ok(include_usage)
}

/// A message's `content`: a string, or a list of text parts (as Open WebUI and LangChain send).
fn content(i: usize, v: &Value) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t),
                _ => Err(ApiError::field(&param, format!("{param}: only text parts are supported, got {p}"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(ApiError::field(&param, format!("{param} must be a string or a list of text parts, got {v}"))),
    }
}

fn message(i: usize, v: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let obj = v.as_object().ok_or_else(|| ApiError::field(&param, format!("{param} must be an object, got {v}")))?;
    let role = match obj.get("role").and_then(Value::as_str) {
        Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
        // OpenAI's newer name for the system role.
        Some("developer") => "system",
        other => {
            let got = other.map_or_else(|| "none".to_string(), |r| format!("`{r}`"));
            return Err(ApiError::field(&format!("{param}.role"), format!("{param}.role must be system, user, assistant or tool, got {got}")));
        }
    };
    for (k, x) in obj {
        let empty = x.is_null() || x.as_array().is_some_and(Vec::is_empty);
        // What clients echo back from an earlier answer, empty: changes nothing.
        let echoed = matches!(k.as_str(), "tool_calls" | "refusal" | "function_call" | "audio") && empty;
        let calls = matches!((role, k.as_str()), ("assistant", "tool_calls") | ("tool", "tool_call_id"));
        if !(matches!(k.as_str(), "role" | "content" | "name") || echoed || calls) {
            return Err(ApiError::field(&format!("{param}.{k}"), format!("`{param}.{k}` is not supported")));
        }
    }
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(v) => return Err(ApiError::field(&format!("{param}.name"), format!("{param}.name must be a string, got {v}"))),
    };
    let text = obj.get("content").filter(|c| !c.is_null()).map(|c| content(i, c)).transpose()?.unwrap_or_default();
    let tool_calls = match obj.get("tool_calls") {
        Some(v) if role == "assistant" && v.as_array().is_some_and(|l| !l.is_empty()) => Some(tools::sent_calls(&format!("{param}.tool_calls"), v)?),
        _ => None,
    };
    let tool_call_id = match obj.get("tool_call_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(v) => return Err(ApiError::field(&format!("{param}.tool_call_id"), format!("{param}.tool_call_id must be a string, got {v}"))),
    };
    Ok(Message { name, tool_calls, tool_call_id, ..Message::new(role, text) })
}

fn input(endpoint: Endpoint, v: &Value) -> Result<Input, ApiError> {
    match endpoint {
        Endpoint::Chat => {
            let list = v.as_array().ok_or_else(|| ApiError::field("messages", format!("`messages` must be a list, got {v}")))?;
            if list.is_empty() {
                return Err(ApiError::field("messages", "`messages` is empty"));
            }
            Ok(Input::Messages(list.iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<_, _>>()?))
        }
        Endpoint::Completion => prompts(v).map(Input::Prompts),
    }
}

/// `prompt`: a string, token ids, or a list of up to `MAX_PROMPTS` of either (not mixed with bare ids).
fn prompts(v: &Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = || ApiError::field("prompt", "`prompt` must be a string, a list of token ids, or a list of strings or of token-id lists");
    let one = |v: &Value| match v {
        Value::String(s) => Some(Prompt::Text(s.clone())),
        _ => token_ids(v).map(Prompt::Ids),
    };
    let list = match v {
        Value::String(s) => return Ok(vec![Prompt::Text(s.clone())]),
        Value::Array(list) if list.iter().all(Value::is_number) => return one(v).map(|p| vec![p]).ok_or_else(bad),
        Value::Array(list) if !list.is_empty() => list,
        _ => return Err(bad()),
    };
    if list.len() > MAX_PROMPTS {
        return Err(ApiError::field("prompt", format!("`prompt` lists {} prompts; at most {MAX_PROMPTS} are taken", list.len())));
    }
    list.iter().map(|p| one(p).ok_or_else(bad)).collect()
}

/// A count in `0..=max`, else a 400 naming `key`.
fn at_most(key: &str, v: &Value, max: usize) -> Result<usize, ApiError> {
    match v.as_u64() {
        Some(k) if k as usize <= max => Ok(k as usize),
        _ => Err(ApiError::field(key, format!("`{key}` must be a whole number from 0 to {max}, got {v}"))),
    }
}

fn flag(key: &str, v: &Value) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| ApiError::field(key, format!("`{key}` must be true or false, got {v}")))
}

/// The fields that shape the answer's choices rather than the sampling, gathered while parsing and
/// checked together once every field is read.
#[derive(Default)]
struct Shape {
    logprobs: Option<bool>,
    completion_logprobs: Option<usize>,
    top_logprobs: Option<usize>,
    echo: bool,
    n: Option<usize>,
    continue_final: Option<bool>,
    add_generation_prompt: Option<bool>,
}

impl Shape {
    /// Reads `key` if it is one of these fields.
    fn read(&mut self, endpoint: Endpoint, key: &str, v: &Value) -> Result<bool, ApiError> {
        match (endpoint, key) {
            (Endpoint::Chat, "logprobs") => self.logprobs = Some(flag(key, v)?),
            (Endpoint::Chat, "top_logprobs") => self.top_logprobs = Some(at_most(key, v, MAX_TOP_LOGPROBS)?),
            (Endpoint::Chat, "continue_final_message") => self.continue_final = Some(flag(key, v)?),
            (Endpoint::Chat, "add_generation_prompt") => self.add_generation_prompt = Some(flag(key, v)?),
            (Endpoint::Completion, "logprobs") => self.completion_logprobs = Some(at_most(key, v, MAX_TOP_LOGPROBS)?),
            (Endpoint::Completion, "echo") => self.echo = flag(key, v)?,
            (_, "n") => match v.as_u64() {
                Some(n) if (1..=MAX_N as u64).contains(&n) => self.n = Some(n as usize),
                _ => return Err(ApiError::field("n", format!("`n` must be a whole number from 1 to {MAX_N}, got {v}"))),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Chat's `top_logprobs` needs `logprobs: true`, as OpenAI has it.
    fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => Ok(Some(top.unwrap_or(0))),
            (_, Some(k)) if k > 0 => Err(ApiError::field("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            _ => Ok(self.completion_logprobs),
        }
    }

    /// A trailing assistant message is continued unless `continue_final_message: false` says not
    /// (llama-server continues it; vLLM when asked); otherwise `add_generation_prompt` (default true).
    fn ending(&self, input: &Input) -> Result<Ending, ApiError> {
        let Input::Messages(m) = input else { return Ok(Ending::Open) };
        let trailing = m.last().is_some_and(|m| m.role == "assistant");
        match (self.continue_final, self.add_generation_prompt) {
            (Some(true), Some(true)) => {
                Err(ApiError::field("add_generation_prompt", "`add_generation_prompt` and `continue_final_message` cannot both be true"))
            }
            (Some(true), _) if !trailing => Err(ApiError::field("continue_final_message", "`continue_final_message` needs a final assistant message")),
            (None, None) | (Some(true), _) if trailing => Ok(Ending::Continue),
            (_, Some(false)) => Ok(Ending::Closed),
            _ => Ok(Ending::Open),
        }
    }
}

impl Request {
    /// Checks a body's fields; `defaults` are the server's sampling settings (generation_config.json
    /// under the command line's flags).
    pub fn parse(endpoint: Endpoint, body: &[u8], defaults: &SamplingParams) -> Result<Request, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        let input_key = if endpoint == Endpoint::Chat { "messages" } else { "prompt" };
        let mut r = Request {
            model: None,
            input: Input::Prompts(Vec::new()),
            max_tokens: None,
            sampling: defaults.clone(),
            stop: Vec::new(),
            stream: false,
            include_usage: false,
            logprobs: None,
            echo: false,
            n: 1,
            ending: Ending::Open,
            format: None,
            tools: None,
        };
        let (mut tools, mut tool_choice) = (None, None);
        let mut shape = Shape::default();
        let mut has_input = false;
        let mut max_completion_tokens = None;
        for (key, v) in &obj {
            if v.is_null() {
                continue;
            }
            if shape.read(endpoint, key, v)? {
                continue;
            }
            match key.as_str() {
                k if k == input_key => {
                    r.input = input(endpoint, v)?;
                    has_input = true;
                }
                "model" => r.model = Some(v.as_str().ok_or_else(|| ApiError::field("model", "`model` must be a string"))?.to_string()),
                "max_tokens" => r.max_tokens = Some(count(key, v)? as usize),
                "max_completion_tokens" => max_completion_tokens = Some(count(key, v)? as usize),
                "temperature" | "top_p" | "min_p" | "frequency_penalty" | "presence_penalty" => set(&mut r.sampling, key, number(key, v)?.to_string())?,
                // vLLM's name and llama-server's for the same penalty (over the last repeat_last_n tokens).
                "repetition_penalty" | "repeat_penalty" => set(&mut r.sampling, "repeat_penalty", number(key, v)?.to_string())?,
                "repeat_last_n" => r.sampling.repeat_last_n = count(key, v)? as usize,
                "logit_bias" => r.sampling.logit_bias = logit_bias(v)?,
                // 0 (llama-server) or -1 (vLLM) keeps every token.
                "top_k" if v.as_i64() == Some(-1) => r.sampling.top_k = None,
                "top_k" => set(&mut r.sampling, key, count(key, v)?.to_string())?,
                // Any integer is a seed; negative ones keep their two's-complement bits.
                "seed" => {
                    r.sampling.seed =
                        v.as_u64().or(v.as_i64().map(|s| s as u64)).ok_or_else(|| ApiError::field("seed", format!("`seed` must be an integer, got {v}")))?
                }
                "stop" => r.stop = stops(v)?,
                "stream" => r.stream = flag(key, v)?,
                "stream_options" => r.include_usage = stream_options(v)?,
                "response_format" => r.format = response_format(v)?,
                "tools" if endpoint == Endpoint::Chat => tools = Some(v),
                "tool_choice" if endpoint == Endpoint::Chat => tool_choice = Some(v),
                k => match neutral(endpoint, k, v) {
                    Some(true) => {}
                    Some(false) => return Err(ApiError::field(k, format!("`{k}` = {v} is not supported (it would change the result)"))),
                    None => return Err(ApiError::field(k, format!("unsupported field `{k}`"))),
                },
            }
        }
        if !has_input {
            return Err(ApiError::field(input_key, format!("`{input_key}` is required")));
        }
        (r.logprobs, r.echo, r.n, r.ending) = (shape.logprobs()?, shape.echo, shape.n.unwrap_or(1), shape.ending(&r.input)?);
        r.max_tokens = max_completion_tokens.or(r.max_tokens);
        r.tools = Tools::parse(tools, tool_choice)?;
        if r.max_tokens == Some(0) {
            return Err(ApiError::field("max_tokens", "`max_tokens` must be at least 1"));
        }
        Ok(r)
    }
}

/// `stop` or `length`, as OpenAI reports why an answer ended.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString | StopReason::Interrupted => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

/// Token counts of one answer; `cached_tokens` are prompt tokens the KV cache already held.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// One choice of a whole answer.
#[derive(Debug, Clone)]
pub struct Choice {
    pub index: usize,
    pub text: String,
    pub finish: &'static str,
    /// The endpoint's log-probabilities object, or null.
    pub logprobs: Value,
    /// Chat: the answer as function calls (`tools::wire_calls`), which then has no text.
    pub tool_calls: Option<Value>,
}

/// What one stream chunk adds to its choice.
#[derive(Debug, Clone, Default)]
pub struct Delta<'a> {
    pub role: bool,
    pub text: Option<&'a str>,
    pub logprobs: Value,
    /// Chat: the answer's function calls, whole.
    pub tool_calls: Option<Value>,
}

/// A token as the wire shows it: its bytes (a byte-fallback token `<0xE2>` is the one byte; a
/// SentencePiece `▁` is a space; a byte-level BPE piece maps back through GPT-2's byte table) and
/// their text (lossy where the bytes are part of a character).
pub fn token_text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = token_bytes(tok, id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    let Some(piece) = tok.id_to_token(id) else { return Vec::new() };
    let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2);
    if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
        return vec![b];
    }
    let byte_level = tok.inner().get_decoder().and_then(|d| serde_json::to_string(d).ok()).is_some_and(|d| d.contains("\"ByteLevel\""));
    if byte_level {
        if let Some(bytes) = piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>() {
            return bytes;
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// The byte GPT-2's byte-level alphabet writes as `c`: printable bytes stand for themselves, the
/// others, in order, for U+0100 on.
fn byte_level_byte(c: char) -> Option<u8> {
    let kept = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if kept(c) {
        return u8::try_from(c).ok();
    }
    let n = c.checked_sub(256)? as usize;
    (0..=255u32).filter(|&b| !kept(b)).nth(n).and_then(|b| u8::try_from(b).ok())
}

/// JSON has no −∞: a token the model rules out entirely gets −9999, as OpenAI and vLLM write it.
fn wire(logprob: f32) -> f32 {
    logprob.max(-9999.0)
}

/// One choice's log-probabilities, in its endpoint's shape: chat's `content` list of
/// `{token, logprob, bytes, top_logprobs}`, or completions' legacy `tokens`, `token_logprobs`,
/// `top_logprobs` (a dict of the most likely tokens and the chosen one) and `text_offset`.
pub struct Scores {
    endpoint: Endpoint,
    /// Characters of the token texts so far: completions' `text_offset` (vLLM's count).
    offset: usize,
    content: Vec<Value>,
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl Scores {
    pub fn new(endpoint: Endpoint) -> Scores {
        Scores { endpoint, offset: 0, content: vec![], tokens: vec![], token_logprobs: vec![], top: vec![], offsets: vec![] }
    }

    /// Adds token `id`; `lp` is None for a prompt's first token, which nothing predicts.
    pub fn push(&mut self, tok: &Tokenizer, id: u32, lp: Option<&TokenLogprobs>) {
        let (text, bytes) = token_text(tok, id);
        let entry = |id: u32, logprob: f32| {
            let (t, b) = token_text(tok, id);
            json!({ "token": t, "logprob": wire(logprob), "bytes": b })
        };
        match (self.endpoint, lp) {
            (Endpoint::Chat, Some(lp)) => {
                let top: Vec<Value> = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
                self.content.push(json!({ "token": text, "logprob": wire(lp.logprob), "bytes": bytes, "top_logprobs": top }));
            }
            (Endpoint::Chat, None) => {}
            (Endpoint::Completion, lp) => {
                let mut top = Map::new();
                if let Some(lp) = lp {
                    for (t, l) in lp.top.iter().copied().chain(std::iter::once((lp.id, lp.logprob))) {
                        top.entry(token_text(tok, t).0).or_insert(json!(wire(l)));
                    }
                }
                self.tokens.push(json!(text));
                self.token_logprobs.push(lp.map_or(Value::Null, |lp| json!(wire(lp.logprob))));
                self.top.push(if lp.is_some() { Value::Object(top) } else { Value::Null });
                self.offsets.push(self.offset);
            }
        }
        self.offset += text.chars().count();
    }

    /// What was pushed since the last `take`, in the endpoint's shape (the whole answer's when
    /// taken once; a stream chunk's otherwise).
    pub fn take(&mut self) -> Value {
        match self.endpoint {
            Endpoint::Chat => json!({ "content": std::mem::take(&mut self.content) }),
            Endpoint::Completion => json!({
                "tokens": std::mem::take(&mut self.tokens),
                "token_logprobs": std::mem::take(&mut self.token_logprobs),
                "top_logprobs": std::mem::take(&mut self.top),
                "text_offset": std::mem::take(&mut self.offsets),
            }),
        }
    }
}

/// What every object of one answer repeats: its id, creation time and model (OpenAI's envelope).
#[derive(Debug, Clone)]
pub struct Envelope {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn with_choices(&self, chunk: bool, choices: Value) -> Value {
        json!({ "id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices })
    }

    /// The whole answer, not streamed.
    pub fn response(&self, choices: Vec<Choice>, usage: Usage) -> Value {
        let choices: Vec<Value> = choices
            .into_iter()
            .map(|c| match self.endpoint {
                Endpoint::Chat => {
                    let message = match c.tool_calls {
                        Some(calls) => json!({ "role": "assistant", "content": null, "tool_calls": calls }),
                        None => json!({ "role": "assistant", "content": c.text }),
                    };
                    json!({ "index": c.index, "message": message, "logprobs": c.logprobs, "finish_reason": c.finish })
                }
                Endpoint::Completion => json!({ "index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish }),
            })
            .collect();
        let mut v = self.with_choices(false, Value::Array(choices));
        v["usage"] = json!(usage);
        v
    }

    /// A stream chunk of choice `index`: `delta.role` opens a chat answer, `delta.text` continues it,
    /// `finish` ends it. With `include_usage` every chunk carries `"usage": null`, as OpenAI sends them.
    pub fn chunk(&self, index: usize, delta: Delta, finish: Option<&str>, include_usage: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut d = Map::new();
                if delta.role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta.text.or(delta.role.then_some("")) {
                    d.insert("content".into(), json!(t));
                }
                if let Some(calls) = delta.tool_calls {
                    d.insert("tool_calls".into(), calls);
                }
                json!({ "index": index, "delta": d, "logprobs": delta.logprobs, "finish_reason": finish })
            }
            Endpoint::Completion => json!({ "index": index, "text": delta.text.unwrap_or(""), "logprobs": delta.logprobs, "finish_reason": finish }),
        };
        let mut v = self.with_choices(true, json!([choice]));
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The last chunk before `[DONE]` when the client asked for `stream_options.include_usage`.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut v = self.with_choices(true, json!([]));
        v["usage"] = json!(usage);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: &str) -> Result<Request, ApiError> {
        Request::parse(endpoint, body.as_bytes(), &SamplingParams::default())
    }

    #[test]
    fn fields_that_change_nothing_are_accepted_and_others_named() {
        let ok = r#"{"messages":[{"role":"user","content":"hi"}],"user":"u","presence_penalty":0,"frequency_penalty":0,"logprobs":false,"n":1,"logit_bias":{},"tools":[],"response_format":{"type":"text"}}"#;
        assert!(parse(Endpoint::Chat, ok).unwrap().sampling.logit_bias.is_empty());
        assert!(parse(Endpoint::Chat, ok).is_ok());
        for (field, body) in [
            ("presence_penalty", r#"{"messages":[{"role":"user","content":"hi"}],"presence_penalty":3}"#),
            ("top_k", r#"{"messages":[{"role":"user","content":"hi"}],"top_k":-2}"#),
            ("logit_bias", r#"{"messages":[{"role":"user","content":"hi"}],"logit_bias":{"5":101}}"#),
            ("logit_bias", r#"{"messages":[{"role":"user","content":"hi"}],"logit_bias":{"x":1}}"#),
            ("min_p", r#"{"messages":[{"role":"user","content":"hi"}],"min_p":1.5}"#),
            ("repetition_penalty", r#"{"messages":[{"role":"user","content":"hi"}],"repetition_penalty":"x"}"#),
            ("echo", r#"{"messages":[{"role":"user","content":"hi"}],"echo":true}"#),
            ("n", r#"{"messages":[{"role":"user","content":"hi"}],"n":9}"#),
            ("top_k_typo", r#"{"messages":[{"role":"user","content":"hi"}],"top_k_typo":3}"#),
            ("messages[0].role", r#"{"messages":[{"role":"function","content":"x"}]}"#),
            ("messages[0].content", r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#),
            ("temperature", r#"{"messages":[{"role":"user","content":"hi"}],"temperature":-1}"#),
            ("messages", r#"{"model":"m"}"#),
            ("prompt", r#"{"prompt":["a","b","c","d","e","f","g","h","i"]}"#),
        ] {
            let endpoint = if field == "prompt" { Endpoint::Completion } else { Endpoint::Chat };
            let e = parse(endpoint, body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e:?}");
            assert!(e.message.contains(field.split('[').next().unwrap_or(field)), "{e:?}");
        }
    }

    #[test]
    fn values_override_the_defaults_and_content_parts_join() {
        let body = r#"{"messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
            "temperature":0.5,"top_p":0.9,"seed":-1,"stop":"X","max_tokens":7,"max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#;
        let r = parse(Endpoint::Chat, body).unwrap();
        assert_eq!(r.input, Input::Messages(vec![Message::system("be brief"), Message::user("ab")]));
        assert_eq!((r.sampling.temperature, r.sampling.top_p, r.sampling.seed), (0.5, Some(0.9), u64::MAX));
        assert_eq!((r.stop, r.max_tokens, r.stream, r.include_usage), (vec!["X".to_string()], Some(5), true, true));
        let d = parse(Endpoint::Completion, r#"{"prompt":"x","temperature":null}"#).unwrap();
        assert_eq!(d.sampling, SamplingParams::default(), "null means absent");
    }

    /// A completions prompt of token ids (a list, or a list holding one list) is taken as it is.
    #[test]
    fn token_id_prompts() {
        for body in [r#"{"prompt":[1,22557,28705]}"#, r#"{"prompt":[[1,22557,28705]]}"#] {
            assert_eq!(parse(Endpoint::Completion, body).unwrap().input, Input::Prompts(vec![Prompt::Ids(vec![1, 22557, 28705])]), "{body}");
        }
        for body in [r#"{"prompt":[]}"#, r#"{"prompt":[1,-2]}"#, r#"{"prompt":[1,"a"]}"#, r#"{"prompt":[[1],[]]}"#, r#"{"prompt":[["a"]]}"#, r#"{"prompt":5}"#]
        {
            assert_eq!(parse(Endpoint::Completion, body).unwrap_err().param.as_deref(), Some("prompt"), "{body}");
        }
    }

    /// Several prompts, of text or of ids, are one choice each, in order; more than `MAX_PROMPTS` are refused.
    #[test]
    fn prompt_lists() {
        let r = parse(Endpoint::Completion, r#"{"prompt":["a",[1,2],"b"]}"#).unwrap();
        assert_eq!(r.input, Input::Prompts(vec![Prompt::Text("a".into()), Prompt::Ids(vec![1, 2]), Prompt::Text("b".into())]));
        let eight = serde_json::to_string(&vec!["x"; MAX_PROMPTS]).unwrap();
        assert!(parse(Endpoint::Completion, &format!(r#"{{"prompt":{eight}}}"#)).is_ok());
        let nine = serde_json::to_string(&vec![vec![1]; MAX_PROMPTS + 1]).unwrap();
        let e = parse(Endpoint::Completion, &format!(r#"{{"prompt":{nine}}}"#)).unwrap_err();
        assert!(e.param.as_deref() == Some("prompt") && e.message.contains("at most 8"), "{e:?}");
    }

    /// logprobs, top_logprobs, echo and n: OpenAI's ranges, each bad value a 400 naming its field.
    #[test]
    fn logprobs_echo_and_n_are_checked() {
        let chat = |extra: &str| parse(Endpoint::Chat, &format!(r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#));
        let completion = |extra: &str| parse(Endpoint::Completion, &format!(r#"{{"prompt":"hi"{extra}}}"#));
        assert_eq!(chat(r#","logprobs":true"#).unwrap().logprobs, Some(0));
        assert_eq!(chat(r#","logprobs":true,"top_logprobs":20"#).unwrap().logprobs, Some(20));
        assert_eq!(chat(r#","logprobs":false,"top_logprobs":0"#).unwrap().logprobs, None);
        assert_eq!(completion(r#","logprobs":0"#).unwrap().logprobs, Some(0));
        assert_eq!(completion(r#","logprobs":5,"echo":true,"n":8"#).map(|r| (r.logprobs, r.echo, r.n)).unwrap(), (Some(5), true, 8));
        assert_eq!(completion("").map(|r| (r.logprobs, r.echo, r.n)).unwrap(), (None, false, 1));
        let refused = [
            (chat(r#","logprobs":true,"top_logprobs":21"#), "top_logprobs"),
            (chat(r#","logprobs":true,"top_logprobs":-1"#), "top_logprobs"),
            (chat(r#","top_logprobs":2"#), "top_logprobs"),
            (chat(r#","logprobs":1"#), "logprobs"),
            (completion(r#","logprobs":21"#), "logprobs"),
            (completion(r#","logprobs":-1"#), "logprobs"),
            (completion(r#","logprobs":true"#), "logprobs"),
            (completion(r#","echo":"yes""#), "echo"),
            (completion(r#","n":0"#), "n"),
            (completion(r#","n":1.5"#), "n"),
            (chat(r#","n":9"#), "n"),
        ];
        for (r, field) in refused {
            let e = r.unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (axum::http::StatusCode::BAD_REQUEST, Some(field)), "{e:?}");
        }
    }

    /// A trailing assistant message is continued unless the request says otherwise (vLLM's fields).
    #[test]
    fn a_trailing_assistant_message_is_continued() {
        let ending = |msgs: &str, extra: &str| parse(Endpoint::Chat, &format!(r#"{{"messages":{msgs}{extra}}}"#)).map(|r| r.ending);
        let (user, prefill) = (r#"[{"role":"user","content":"hi"}]"#, r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"The"}]"#);
        assert_eq!(ending(user, "").unwrap(), Ending::Open);
        assert_eq!(ending(prefill, "").unwrap(), Ending::Continue);
        assert_eq!(ending(prefill, r#","continue_final_message":true,"add_generation_prompt":false"#).unwrap(), Ending::Continue);
        assert_eq!(ending(prefill, r#","continue_final_message":false"#).unwrap(), Ending::Open);
        assert_eq!(ending(prefill, r#","add_generation_prompt":true"#).unwrap(), Ending::Open);
        assert_eq!(ending(user, r#","add_generation_prompt":false"#).unwrap(), Ending::Closed);
        assert_eq!(ending(user, r#","continue_final_message":true"#).unwrap_err().param.as_deref(), Some("continue_final_message"));
        let both = ending(prefill, r#","continue_final_message":true,"add_generation_prompt":true"#).unwrap_err();
        assert_eq!(both.param.as_deref(), Some("add_generation_prompt"));
        assert_eq!(ending(user, r#","add_generation_prompt":1"#).unwrap_err().param.as_deref(), Some("add_generation_prompt"));
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-mistral-f32/tokenizer.json")).unwrap()
    }

    /// Tokens on the wire: SentencePiece's `▁` is a space, a byte-fallback token its one byte, a
    /// byte-level piece its bytes.
    #[test]
    fn token_texts_and_bytes() {
        let tok = tokenizer();
        let hello = tok.token_id("\u{2581}Hello").unwrap();
        assert_eq!(token_text(&tok, hello), (" Hello".to_string(), b" Hello".to_vec()));
        let e2 = tok.token_id("<0xE2>").unwrap();
        assert_eq!(token_text(&tok, e2).1, vec![0xE2]);
        assert_eq!(token_text(&tok, 1).0, "<s>");
        assert_eq!((byte_level_byte('Ġ'), byte_level_byte('a'), byte_level_byte('Ċ')), (Some(b' '), Some(b'a'), Some(b'\n')));
    }

    /// Chat's `content` entries and completions' legacy lists, with a prompt's first token unscored.
    #[test]
    fn scores_in_both_shapes() {
        let tok = tokenizer();
        let (hello, there) = (tok.token_id("\u{2581}Hello").unwrap(), tok.token_id("\u{2581}there").unwrap());
        let lp = TokenLogprobs { id: there, logprob: -0.5, top: vec![(hello, -0.25), (there, -0.5)] };
        let mut chat = Scores::new(Endpoint::Chat);
        chat.push(&tok, there, Some(&lp));
        let v = chat.take();
        assert_eq!(v["content"][0]["token"], " there");
        assert_eq!(v["content"][0]["logprob"], -0.5);
        assert_eq!(v["content"][0]["bytes"], json!(b" there".to_vec()));
        assert_eq!(v["content"][0]["top_logprobs"][0], json!({ "token": " Hello", "logprob": -0.25, "bytes": b" Hello".to_vec() }));
        assert_eq!(chat.take()["content"], json!([]), "take empties it");
        let mut legacy = Scores::new(Endpoint::Completion);
        legacy.push(&tok, hello, None);
        let minus_inf = TokenLogprobs { id: hello, logprob: f32::NEG_INFINITY, top: vec![(there, -0.5)] };
        legacy.push(&tok, there, Some(&lp));
        legacy.push(&tok, hello, Some(&minus_inf));
        let v = legacy.take();
        assert_eq!(v["tokens"], json!([" Hello", " there", " Hello"]));
        assert_eq!(v["token_logprobs"], json!([null, -0.5, -9999.0]));
        assert_eq!(v["top_logprobs"], json!([null, { " Hello": -0.25, " there": -0.5 }, { " there": -0.5, " Hello": -9999.0 }]));
        assert_eq!(v["text_offset"], json!([0, 6, 12]));
    }

    /// A message's `name` reaches the template as `message.name`; a non-string name is refused.
    #[test]
    fn message_names_are_kept_for_the_template() {
        let r = parse(Endpoint::Chat, r#"{"messages":[{"role":"user","content":"hi","name":"ada"},{"role":"user","content":"yo"}]}"#).unwrap();
        let Input::Messages(m) = r.input else { panic!("chat input") };
        assert_eq!((m[0].name.as_deref(), m[1].name.as_deref()), (Some("ada"), None));
        let e = parse(Endpoint::Chat, r#"{"messages":[{"role":"user","content":"hi","name":5}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].name"));
        let t = crate::template::ChatTemplate::from_source("{% for m in messages %}{{ m.name or 'anon' }}: {{ m.content }}\n{% endfor %}", Default::default())
            .unwrap();
        assert_eq!(t.render(&m, false).unwrap(), "ada: hi\nanon: yo\n");
    }

    /// llama-server's and vLLM's sampling fields map onto the one `SamplingParams` the CLI flags set.
    #[test]
    fn sampling_controls_of_llama_server_and_vllm() {
        let body = r#"{"prompt":"x","top_k":5,"min_p":0.1,"repetition_penalty":1.3,"repeat_last_n":16,"frequency_penalty":0.5,"presence_penalty":-0.25}"#;
        let s = parse(Endpoint::Completion, body).unwrap().sampling;
        assert_eq!((s.top_k, s.min_p, s.repeat_penalty, s.repeat_last_n), (Some(5), Some(0.1), 1.3, 16));
        assert_eq!((s.frequency_penalty, s.presence_penalty), (0.5, -0.25));
        for off in ["0", "-1"] {
            let s = parse(Endpoint::Completion, &format!(r#"{{"prompt":"x","top_k":{off}}}"#)).unwrap().sampling;
            assert_eq!(s.top_k, None, "top_k {off} keeps every token");
        }
        let s = parse(Endpoint::Completion, r#"{"prompt":"x","logit_bias":{"7":-100,"32000":2.5}}"#).unwrap().sampling;
        let mut bias = s.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, -100.0), (32000, 2.5)]);
        let s = parse(Endpoint::Completion, r#"{"prompt":"x","repeat_penalty":1.1}"#).unwrap().sampling;
        assert_eq!(s.repeat_penalty, 1.1);
    }

    #[test]
    fn a_tiny_temperature_is_accepted_and_samples() {
        // logit / 1e-300 overflows f32; the request must still be answered (it once got a 500).
        let r = parse(Endpoint::Completion, r#"{"prompt":"x","temperature":1e-300,"top_p":0.5}"#).unwrap();
        let logits = candle_core::Tensor::new(&[0.5f32, 4.0, -2.0], &candle_core::Device::Cpu).unwrap();
        assert_eq!(crate::sampling::Sampler::new(r.sampling).sample(&logits, &[]).unwrap(), 1);
    }
}
