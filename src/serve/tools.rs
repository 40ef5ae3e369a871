//! Tool calls on a model of any template: the request's `tools` and `tool_choice` checked, the
//! functions shown to the model (through the chat template when it renders `tools`, else by expanse's
//! convention below), the answer constrained to a call when one is required, and a call in the answer
//! turned into OpenAI's `tool_calls`.
//!
//! The convention (README, "Structured output and tools"), for templates that do not render tools
//! themselves: a system message (for a template that refuses one, the start of the first user
//! message) lists the functions, one JSON object per line (`name`, `description`, `parameters`), and
//! asks for a call as the whole answer in the form `{"name": NAME, "arguments": {...}}`. An earlier
//! call (an assistant message's `tool_calls`) is written back in that form, and `tool` messages as one
//! user message of `Result of NAME: CONTENT` lines. With `tool_choice` `required` or a named function the
//! answer is constrained to that form (so it always parses and its arguments match the schema); with
//! `auto` the model may answer in text, and an answer that is such a call, bare or inside
//! `<tool_call>…</tool_call>` (Hermes, Qwen), becomes one.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use super::error::ApiError;
use crate::constraint::Grammar;
use crate::template::Message;

/// One function a request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of its arguments (`{"type": "object"}` when the request gives none).
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model decides (the default with tools).
    Auto,
    /// Some function must be called.
    Required,
    /// This function must be called.
    Named(String),
}

/// A request's functions and how they may be called. A request with `tool_choice: "none"` has none.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    /// The request's `tools` as sent, for templates that render them.
    pub definitions: Value,
}

/// A call found in an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

fn function(i: usize, v: &Value) -> Result<Function, ApiError> {
    let param = format!("tools[{i}]");
    let kind = v.get("type").and_then(Value::as_str);
    let f = v.get("function").filter(|_| kind == Some("function")).and_then(Value::as_object);
    let Some(f) = f else {
        return Err(ApiError::field(&param, format!("{param} must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {v}")));
    };
    let name = f.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
    let Some(name) = name else { return Err(ApiError::field(&format!("{param}.function.name"), format!("{param}.function.name must be a non-empty string"))) };
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(d) => return Err(ApiError::field(&format!("{param}.function.description"), format!("{param}.function.description must be a string, got {d}"))),
    };
    let at = format!("{param}.function.parameters");
    let mut parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({ "type": "object" }),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(p) => return Err(ApiError::field(&at, format!("{at} must be a JSON schema object, got {p}"))),
    };
    // A call's arguments are an object (OpenAI's rule): a schema that leaves the type open is made
    // one; a schema of another type could never be called.
    match parameters.get("type") {
        None => parameters["type"] = json!("object"),
        Some(t) if t == "object" => {}
        Some(Value::Array(types)) if types.iter().any(|t| t == "object") => parameters["type"] = json!("object"),
        Some(t) => return Err(ApiError::field(&at, format!("{at} must describe an object (type \"object\"), got type {t}"))),
    }
    Ok(Function { name: name.to_string(), description, parameters })
}

impl Tools {
    /// `tools` and `tool_choice` (either may be absent); None when no function may be called.
    pub fn parse(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<Tools>, ApiError> {
        let list = match tools {
            None | Some(Value::Null) => &Vec::new(),
            Some(Value::Array(list)) => list,
            Some(v) => return Err(ApiError::field("tools", format!("`tools` must be a list, got {v}"))),
        };
        let functions = list.iter().enumerate().map(|(i, v)| function(i, v)).collect::<Result<Vec<_>, _>>()?;
        if let Some(dup) = functions.iter().enumerate().find(|(i, f)| functions[..*i].iter().any(|g| g.name == f.name)) {
            return Err(ApiError::field("tools", format!("function `{}` is listed twice", dup.1.name)));
        }
        let bad = |v: &Value| {
            ApiError::field(
                "tool_choice",
                format!("`tool_choice` must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {v}"),
            )
        };
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) if s == "none" => return Ok(None),
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(v @ Value::Object(o)) => {
                match (o.get("type").and_then(Value::as_str), o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str)) {
                    (Some("function"), Some(name)) if functions.iter().any(|f| f.name == name) => ToolChoice::Named(name.to_string()),
                    (Some("function"), Some(name)) => {
                        return Err(ApiError::field("tool_choice", format!("tool_choice names `{name}`, which `tools` does not list")))
                    }
                    _ => return Err(bad(v)),
                }
            }
            Some(v) => return Err(bad(v)),
        };
        if functions.is_empty() {
            return match choice {
                ToolChoice::Auto => Ok(None),
                _ => Err(ApiError::field("tool_choice", "`tool_choice` asks for a call, but `tools` lists no function")),
            };
        }
        Ok(Some(Tools { functions, choice, definitions: Value::Array(list.clone()) }))
    }

    /// The grammar a required call constrains the answer to: one call of a listed function (the
    /// named one), its arguments valid against that function's schema. Each function's parameters are
    /// a resource of their own (an `$id`, unless they carry one), so that their own `$ref`s —
    /// `#/$defs/X`, as Pydantic writes them — resolve inside them, not at the wrapper's root.
    pub fn grammar(&self) -> Option<Grammar> {
        let named = |f: &Function| match &self.choice {
            ToolChoice::Named(n) => &f.name == n,
            _ => true,
        };
        let mut calls = Vec::new();
        for (i, f) in self.functions.iter().enumerate().filter(|(_, f)| named(f)) {
            let mut params = f.parameters.clone();
            if let Some(p) = params.as_object_mut() {
                p.entry("$id").or_insert_with(|| json!(format!("urn:expanse:tool:{i}")));
            }
            calls.push(json!({
                "type": "object",
                "properties": { "name": { "const": f.name }, "arguments": params },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }));
        }
        match (&self.choice, calls.len()) {
            (ToolChoice::Auto, _) | (_, 0) => None,
            (_, 1) => calls.pop().map(Grammar::Json),
            _ => Some(Grammar::Json(json!({ "anyOf": calls }))),
        }
    }

    /// The system text of the convention: the functions and the form of a call.
    fn instructions(&self) -> String {
        let mut text = String::from("You can call these functions (name, description and the JSON schema of the arguments):\n");
        for f in &self.functions {
            let line = json!({ "name": f.name, "description": f.description, "parameters": f.parameters });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        text.push_str("To call a function, answer with only a JSON object: {\"name\": <function name>, \"arguments\": <the arguments, a JSON object>}.");
        match &self.choice {
            ToolChoice::Auto => text.push_str(" Otherwise answer normally."),
            ToolChoice::Required => text.push_str(" Answer with a function call."),
            ToolChoice::Named(n) => text.push_str(&format!(" Answer by calling `{n}`.")),
        }
        text
    }

    /// The conversation as the template is given it. A template that renders `tools` gets the
    /// messages as they are (and the tools beside them, `Prompter::encode_with_tools`); any other gets
    /// the convention's forms of earlier calls and results (a run of results, from parallel calls, as
    /// one user message, so that roles still alternate) and its instructions: in the system message,
    /// or, where `into_system` is false (the template refuses a system message), before the first
    /// user message's text.
    pub fn messages(tools: Option<&Tools>, messages: &[Message], template_renders_tools: bool, into_system: bool) -> Vec<Message> {
        if template_renders_tools {
            return messages.to_vec();
        }
        // A run of tool results, and a user message right after them, make one user message.
        let mut out: Vec<Message> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let plain = plain(m, messages);
            let after_result = i > 0 && messages[i - 1].role == "tool";
            match out.last_mut() {
                Some(last) if after_result && matches!(m.role.as_str(), "tool" | "user") => {
                    last.content.push('\n');
                    last.content.push_str(&plain.content);
                }
                _ => out.push(plain),
            }
        }
        let Some(t) = tools else { return out };
        let text = t.instructions();
        match out.iter_mut().find(|m| m.role == "system" || (!into_system && m.role == "user")) {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
            Some(m) => m.content = format!("{text}\n\n{}", m.content),
            None if into_system => out.insert(0, Message::system(text)),
            None => out.insert(0, Message::user(text)),
        }
        out
    }

    /// The calls `text` (a whole answer) makes, if it is nothing but calls of listed functions: a
    /// call object, a list of them, or calls each in `<tool_call>…</tool_call>` (Hermes, Qwen).
    pub fn calls(&self, text: &str) -> Option<Vec<Call>> {
        let t = text.trim();
        let mut list = Vec::new();
        if t.starts_with("<tool_call>") {
            let mut rest = t;
            while !rest.is_empty() {
                let body = rest.strip_prefix("<tool_call>")?;
                // The first closing tag after which the block's text parses (an argument may hold the
                // tag's text itself).
                let (v, end) =
                    body.match_indices("</tool_call>").find_map(|(end, _)| serde_json::from_str::<Value>(body[..end].trim()).ok().map(|v| (v, end)))?;
                match v {
                    Value::Array(l) => list.extend(l),
                    v => list.push(v),
                }
                rest = body[end + "</tool_call>".len()..].trim_start();
            }
        } else {
            match serde_json::from_str(t).ok()? {
                Value::Array(l) if !l.is_empty() => list = l,
                v @ Value::Object(_) => list.push(v),
                _ => return None,
            }
        }
        list.iter().map(|c| self.call(c)).collect()
    }

    /// One call object, if it calls a listed (and allowed) function with an object of arguments
    /// (`arguments`, or `parameters` as Llama 3.1 writes it).
    fn call(&self, c: &Value) -> Option<Call> {
        let name = c.get("name")?.as_str()?;
        let arguments = c.get("arguments").or_else(|| c.get("parameters")).filter(|a| a.is_object())?;
        let listed = self.functions.iter().any(|f| f.name == name);
        let allowed = match &self.choice {
            ToolChoice::Named(n) => n == name,
            _ => true,
        };
        (listed && allowed && c.as_object()?.len() == 2).then(|| Call { name: name.to_string(), arguments: arguments.to_string() })
    }

    /// Whether an answer that begins with `prefix` may still turn out to be a call (a stream holds
    /// its text back until it knows).
    pub fn may_be_call(&self, prefix: &str) -> bool {
        if self.choice != ToolChoice::Auto {
            return true;
        }
        let t = prefix.trim_start();
        t.is_empty() || t.starts_with('{') || t.starts_with('[') || "<tool_call>".starts_with(t) || t.starts_with("<tool_call>")
    }
}

/// A message in the convention's terms: an assistant's calls as their JSON, a tool's result as a user
/// message naming the function (found by its call id among the earlier messages).
fn plain(m: &Message, all: &[Message]) -> Message {
    if m.role == "tool" {
        let name = m.tool_call_id.as_deref().and_then(|id| call_name(all, id)).unwrap_or_else(|| "the function".to_string());
        return Message::user(format!("Result of {name}: {}", m.content));
    }
    let Some(calls) = m.tool_calls.as_ref().and_then(Value::as_array) else { return m.clone() };
    let mut content = m.content.clone();
    for c in calls {
        let f = &c["function"];
        if !content.is_empty() {
            content.push('\n');
        }
        // Written in the order the instructions show a call.
        content.push_str(&format!("{{\"name\": {}, \"arguments\": {}}}", f["name"], f["arguments"]));
    }
    Message { content, tool_calls: None, ..m.clone() }
}

fn call_name(all: &[Message], id: &str) -> Option<String> {
    all.iter()
        .filter_map(|m| m.tool_calls.as_ref()?.as_array())
        .flatten()
        .find(|c| c.get("id").and_then(Value::as_str) == Some(id))
        .and_then(|c| c["function"]["name"].as_str().map(str::to_string))
}

/// An assistant message's `tool_calls` as sent back by a client: each `{id, type: "function",
/// function: {name, arguments}}` with the arguments as JSON text; kept with the arguments parsed (the
/// form chat templates read, as transformers hands them).
pub fn sent_calls(param: &str, v: &Value) -> Result<Value, ApiError> {
    let bad = |why: &str| ApiError::field(param, format!("{param}: {why}"));
    let list = v.as_array().ok_or_else(|| bad("must be a list of calls"))?;
    let calls = list
        .iter()
        .map(|c| {
            let f = c.get("function").ok_or_else(|| bad("each call needs a `function`"))?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| bad("each call's function needs a `name`"))?;
            let arguments = match f.get("arguments") {
                Some(Value::String(s)) => serde_json::from_str(s).map_err(|_| bad("a call's `arguments` must be JSON text"))?,
                Some(a @ Value::Object(_)) => a.clone(),
                _ => return Err(bad("a call's `arguments` must be a JSON object as text")),
            };
            Ok(json!({ "id": c.get("id").cloned().unwrap_or(Value::Null), "type": "function", "function": { "name": name, "arguments": arguments } }))
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(Value::Array(calls))
}

/// OpenAI's `tool_calls` entries for `calls`, each with an id of its own; a stream's delta numbers
/// them (`index`). Ids are 9 letters and digits, the form Mistral's tool templates insist on when a
/// call is sent back (vLLM makes them so too); clients take any string.
pub fn wire_calls(calls: &[Call], streamed: bool) -> Value {
    let list: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let mut call = json!({ "id": call_id(), "type": "function", "function": { "name": c.name, "arguments": c.arguments } });
            if streamed {
                call["index"] = json!(index);
            }
            call
        })
        .collect();
    Value::Array(list)
}

/// A call id: 9 base-62 digits of a counter started at the process's start time, so distinct within
/// a process (for 62⁹ calls) and, across restarts, unlikely to repeat.
fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    let mut n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(start) % 13_537_086_546_263_552; // 62⁹
    const DIGITS: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut id = [b'0'; 9];
    for d in id.iter_mut().rev() {
        *d = DIGITS[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&id).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: Value) -> Tools {
        let list = json!([
            { "type": "function", "function": { "name": "get_weather", "description": "Weather in a city", "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] } } },
            { "type": "function", "function": { "name": "now" } },
        ]);
        Tools::parse(Some(&list), Some(&choice)).unwrap().unwrap()
    }

    #[test]
    fn choices_are_checked_and_none_means_no_tools() {
        assert_eq!(tools(json!("auto")).choice, ToolChoice::Auto);
        assert_eq!(tools(json!({ "type": "function", "function": { "name": "now" } })).choice, ToolChoice::Named("now".into()));
        let list = json!([{ "type": "function", "function": { "name": "a" } }]);
        assert_eq!(Tools::parse(Some(&list), Some(&json!("none"))).unwrap(), None);
        assert_eq!(Tools::parse(Some(&json!([])), None).unwrap(), None);
        for (tools, choice, param) in [
            (json!([{ "type": "function", "function": { "name": "a" } }]), json!({ "type": "function", "function": { "name": "b" } }), "tool_choice"),
            (json!([]), json!("required"), "tool_choice"),
            (json!([{ "type": "function" }]), json!("auto"), "tools[0]"),
            (json!([{ "type": "function", "function": { "name": "" } }]), json!("auto"), "tools[0].function.name"),
            (json!([{ "type": "function", "function": { "name": "a", "parameters": 3 } }]), json!("auto"), "tools[0].function.parameters"),
            (json!([{ "type": "function", "function": { "name": "a" } }, { "type": "function", "function": { "name": "a" } }]), json!("auto"), "tools"),
            (json!([{ "type": "function", "function": { "name": "a" } }]), json!("sometimes"), "tool_choice"),
        ] {
            let e = Tools::parse(Some(&tools), Some(&choice)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e:?}");
        }
    }

    #[test]
    fn an_answer_is_a_call_only_when_it_is_nothing_but_calls_of_listed_functions() {
        let t = tools(json!("auto"));
        let call = t.calls(" {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n").unwrap();
        assert_eq!(call, [Call { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() }]);
        assert_eq!(t.calls("<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>").unwrap().len(), 1);
        assert_eq!(t.calls(r#"[{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}]"#).unwrap().len(), 2);
        let hermes = "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>";
        assert_eq!(t.calls(hermes).unwrap().iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["now", "get_weather"]);
        assert_eq!(t.calls("<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call> and text"), None);
        assert_eq!(t.calls(r#"{"name": "now", "parameters": {"a": 1}}"#).unwrap()[0].arguments, r#"{"a":1}"#, "Llama 3.1's key");
        let tag_inside = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "</tool_call>"}}</tool_call>"#;
        assert_eq!(t.calls(tag_inside).unwrap()[0].arguments, r#"{"city":"</tool_call>"}"#);
        assert_eq!(t.calls(r#"<tool_call>[{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}]</tool_call>"#).unwrap().len(), 2);
        for text in [r#"{"name": "later", "arguments": {}}"#, r#"{"name": "now"}"#, r#"{"name": "now", "arguments": {}, "x": 1}"#, "It is sunny.", "{"] {
            assert_eq!(t.calls(text), None, "{text}");
        }
        let named = tools(json!({ "type": "function", "function": { "name": "now" } }));
        assert_eq!(named.calls(r#"{"name": "get_weather", "arguments": {}}"#), None, "only the named function");
        assert!(t.may_be_call("  {\"na") && t.may_be_call("<tool") && t.may_be_call(""));
        assert!(!t.may_be_call("The weather") && named.may_be_call("The"));
    }

    #[test]
    fn call_ids_are_nine_letters_and_digits_and_distinct() {
        let calls = [Call { name: "now".into(), arguments: "{}".into() }, Call { name: "now".into(), arguments: "{}".into() }];
        let ids: Vec<String> =
            (0..50).flat_map(|_| wire_calls(&calls, false).as_array().unwrap().clone()).map(|c| c["id"].as_str().unwrap().to_string()).collect();
        assert!(ids.iter().all(|id| id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric())), "{ids:?}");
        assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 100);
        assert_eq!(wire_calls(&calls, true)[1]["index"], 1);
        assert!(wire_calls(&calls, false)[0].get("index").is_none());
    }

    /// A function's own `$ref`s (a Pydantic model's `$defs`) resolve inside its parameters (an `$id`
    /// of their own, kept when they bring one; nothing rewritten, literal values included), and
    /// arguments are an object even when the schema leaves the type open.
    #[test]
    fn the_call_grammar_keeps_each_functions_refs_and_asks_for_an_object() {
        let list = json!([
            { "type": "function", "function": { "name": "a", "parameters": { "$defs": { "Loc": { "type": "object", "properties": { "city": { "const": { "$ref": "#/x" } } } } }, "type": "object", "properties": { "loc": { "$ref": "#/$defs/Loc" } } } } },
            { "type": "function", "function": { "name": "b", "parameters": {} } },
            { "type": "function", "function": { "name": "c", "parameters": { "$id": "urn:mine", "type": ["object", "null"] } } },
        ]);
        let t = Tools::parse(Some(&list), Some(&json!("required"))).unwrap().unwrap();
        let Grammar::Json(g) = t.grammar().unwrap();
        let args = |i: usize| g["anyOf"][i]["properties"]["arguments"].clone();
        assert_eq!(args(0)["properties"]["loc"]["$ref"], "#/$defs/Loc");
        assert_eq!(args(0)["$defs"]["Loc"]["properties"]["city"]["const"], json!({ "$ref": "#/x" }), "a literal is left alone");
        assert_eq!((&args(0)["$id"], &args(1)), (&json!("urn:expanse:tool:0"), &json!({ "type": "object", "$id": "urn:expanse:tool:1" })));
        assert_eq!((&args(2)["$id"], &args(2)["type"]), (&json!("urn:mine"), &json!("object")));
        let named = Tools::parse(Some(&list), Some(&json!({ "type": "function", "function": { "name": "b" } }))).unwrap().unwrap();
        let Grammar::Json(g) = named.grammar().unwrap();
        assert_eq!(g["properties"]["name"]["const"], "b", "{g}");
        let array = json!([{ "type": "function", "function": { "name": "f", "parameters": { "type": "array" } } }]);
        assert_eq!(Tools::parse(Some(&array), None).unwrap_err().param.as_deref(), Some("tools[0].function.parameters"));
    }

    #[test]
    fn the_convention_writes_functions_calls_and_results_into_the_conversation() {
        let t = tools(json!("required"));
        let calls = sent_calls(
            "messages[1].tool_calls",
            &json!([{ "id": "call_1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } }]),
        )
        .unwrap();
        let history = [
            Message::user("Weather in Paris?"),
            Message { tool_calls: Some(calls), ..Message::assistant("") },
            Message { tool_call_id: Some("call_1".into()), ..Message::new("tool", "18 C") },
        ];
        let out = Tools::messages(Some(&t), &history, false, true);
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.contains(r#""name":"get_weather""#) && out[0].content.ends_with("Answer with a function call."), "{}", out[0].content);
        assert_eq!(out[2].content, r#"{"name": "get_weather", "arguments": {"city":"Paris"}}"#);
        assert_eq!((out[3].role.as_str(), out[3].content.as_str()), ("user", "Result of get_weather: 18 C"));
        assert_eq!(Tools::messages(Some(&t), &history, true, true), history, "a template that renders tools gets them as sent");
        // A template that refuses a system message: the instructions open the first user message.
        let out = Tools::messages(Some(&t), &history, false, false);
        assert_eq!((out.len(), out[0].role.as_str()), (3, "user"));
        assert!(out[0].content.starts_with("You can call") && out[0].content.ends_with("\n\nWeather in Paris?"), "{}", out[0].content);
        // Two results of parallel calls are one user message: roles still alternate.
        let two = [history[0].clone(), history[1].clone(), history[2].clone(), Message { tool_call_id: Some("call_2".into()), ..Message::new("tool", "rain") }];
        let out = Tools::messages(None, &two, false, true);
        assert_eq!(out.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["user", "assistant", "user"]);
        assert_eq!(out[2].content, "Result of get_weather: 18 C\nResult of the function: rain");
        // A user message right after results joins them, so roles alternate there too.
        let then = [two[1].clone(), two[2].clone(), Message::user("thanks")];
        let out = Tools::messages(Some(&t), &then, false, false);
        assert_eq!(out.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["assistant", "user"]);
        assert!(out[1].content.starts_with("You can call") && out[1].content.ends_with("Result of get_weather: 18 C\nthanks"), "{}", out[1].content);
        assert!(sent_calls("p", &json!([{ "function": { "name": "a", "arguments": "{oops" } }])).is_err());
    }
}
