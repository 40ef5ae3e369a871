//! The OpenAI wire format: request bodies checked field by field into a `Request`, and the
//! `chat.completion` / `text_completion` objects and their stream chunks.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use crate::generation::StopReason;
use crate::sampling::SamplingParams;
use crate::template::Message;

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
    Prompt(String),
    /// A completions prompt given as token ids (vLLM and llama-server take them), run as they are.
    Ids(Vec<u32>),
}

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
}

/// Fields common clients send that change nothing at the value given here; any other value is refused.
fn neutral(endpoint: Endpoint, key: &str, v: &Value) -> Option<bool> {
    let empty = |v: &Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty);
    Some(match key {
        // Bookkeeping for the caller, never read by the model.
        "user" | "metadata" | "store" | "service_tier" | "parallel_tool_calls" => true,
        "logprobs" if endpoint == Endpoint::Chat => v.is_null() || v == &Value::Bool(false),
        "logprobs" | "suffix" => v.is_null(),
        "top_logprobs" => v.is_null() || v.as_u64() == Some(0),
        "tools" | "functions" | "prediction" => empty(v),
        "tool_choice" | "function_call" => v.is_null() || v == "none" || v == "auto",
        "response_format" => v.is_null() || v.get("type").and_then(Value::as_str) == Some("text"),
        "modalities" => v.is_null() || v == &json!(["text"]),
        "echo" => v.is_null() || v == &Value::Bool(false),
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
        Some(r @ ("system" | "user" | "assistant")) => r,
        // OpenAI's newer name for the system role.
        Some("developer") => "system",
        other => {
            let got = other.map_or_else(|| "none".to_string(), |r| format!("`{r}`"));
            return Err(ApiError::field(&format!("{param}.role"), format!("{param}.role must be system, user or assistant, got {got}")));
        }
    };
    for (k, x) in obj {
        let empty = x.is_null() || x.as_array().is_some_and(Vec::is_empty);
        // What clients echo back from an earlier answer, empty: changes nothing.
        let echoed = matches!(k.as_str(), "tool_calls" | "refusal" | "function_call" | "audio") && empty;
        if !(matches!(k.as_str(), "role" | "content" | "name") || echoed) {
            return Err(ApiError::field(&format!("{param}.{k}"), format!("`{param}.{k}` is not supported")));
        }
    }
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(v) => return Err(ApiError::field(&format!("{param}.name"), format!("{param}.name must be a string, got {v}"))),
    };
    let text = obj.get("content").filter(|c| !c.is_null()).map(|c| content(i, c)).transpose()?.unwrap_or_default();
    Ok(Message { name, ..Message::new(role, text) })
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
        Endpoint::Completion => match v {
            Value::String(s) => Ok(Input::Prompt(s.clone())),
            Value::Array(list) if list.len() == 1 && list[0].is_string() => Ok(Input::Prompt(list[0].as_str().unwrap_or_default().to_string())),
            Value::Array(list) if list.len() == 1 && token_ids(&list[0]).is_some() => Ok(Input::Ids(token_ids(&list[0]).unwrap_or_default())),
            _ => match token_ids(v) {
                Some(ids) => Ok(Input::Ids(ids)),
                None => Err(ApiError::field("prompt", "`prompt` must be one string or one list of token ids (several prompts are not supported)")),
            },
        },
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
            input: Input::Prompt(String::new()),
            max_tokens: None,
            sampling: defaults.clone(),
            stop: Vec::new(),
            stream: false,
            include_usage: false,
        };
        let mut has_input = false;
        let mut max_completion_tokens = None;
        for (key, v) in &obj {
            if v.is_null() {
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
                "stream" => r.stream = v.as_bool().ok_or_else(|| ApiError::field("stream", format!("`stream` must be true or false, got {v}")))?,
                "stream_options" => r.include_usage = stream_options(v)?,
                "n" if v.as_u64() == Some(1) => {}
                "n" => return Err(ApiError::field("n", format!("only n = 1 is supported, got {v}"))),
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
        r.max_tokens = max_completion_tokens.or(r.max_tokens);
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
    pub fn response(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish }),
            Endpoint::Completion => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
        };
        let mut v = self.with_choices(false, json!([choice]));
        v["usage"] = json!(usage);
        v
    }

    /// A stream chunk: `role` opens a chat answer, `text` continues it, `finish` ends it. With
    /// `include_usage` every chunk carries `"usage": null`, as OpenAI sends them.
    pub fn chunk(&self, role: bool, text: Option<&str>, finish: Option<&str>, include_usage: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text.or(role.then_some("")) {
                    delta.insert("content".into(), json!(t));
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Endpoint::Completion => json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish }),
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
            ("logprobs", r#"{"messages":[{"role":"user","content":"hi"}],"logprobs":true}"#),
            ("n", r#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#),
            ("top_k_typo", r#"{"messages":[{"role":"user","content":"hi"}],"top_k_typo":3}"#),
            ("messages[0].role", r#"{"messages":[{"role":"tool","content":"x"}]}"#),
            ("messages[0].content", r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#),
            ("temperature", r#"{"messages":[{"role":"user","content":"hi"}],"temperature":-1}"#),
            ("messages", r#"{"model":"m"}"#),
            ("prompt", r#"{"prompt":["a","b"]}"#),
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
            assert_eq!(parse(Endpoint::Completion, body).unwrap().input, Input::Ids(vec![1, 22557, 28705]), "{body}");
        }
        for body in [r#"{"prompt":[]}"#, r#"{"prompt":[1,-2]}"#, r#"{"prompt":[1,"a"]}"#, r#"{"prompt":[[1],[2]]}"#, r#"{"prompt":["a","b"]}"#] {
            assert_eq!(parse(Endpoint::Completion, body).unwrap_err().param.as_deref(), Some("prompt"), "{body}");
        }
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
