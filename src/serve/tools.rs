//! Tool calls on a model of any template: the request's `tools` and `tool_choice` checked, the
//! functions shown to the model (through the chat template when it renders `tools`, else by expanse's
//! convention below), the answer constrained to a call when one is required, and a call in the answer
//! turned into OpenAI's `tool_calls`.
//!
//! The convention (README, "Tools"), for templates that do not render tools themselves: a system
//! message lists the functions, one JSON object per line (`name`, `description`, `parameters`), and
//! asks for a call as the whole answer in the form `{"name": NAME, "arguments": {...}}`. An earlier
//! call (an assistant message's `tool_calls`) is written back in that form, and a `tool` message as a
//! user message `Result of NAME: CONTENT`. With `tool_choice` `required` or a named function the
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
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({ "type": "object" }),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(p) => {
            return Err(ApiError::field(&format!("{param}.function.parameters"), format!("{param}.function.parameters must be a JSON schema object, got {p}")))
        }
    };
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
    /// named one), its arguments valid against that function's schema.
    pub fn grammar(&self) -> Option<Grammar> {
        let one = |f: &Function| {
            json!({
                "type": "object",
                "properties": { "name": { "const": f.name }, "arguments": f.parameters },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        };
        match &self.choice {
            ToolChoice::Auto => None,
            ToolChoice::Required => Some(Grammar::Json(json!({ "anyOf": self.functions.iter().map(one).collect::<Vec<_>>() }))),
            ToolChoice::Named(n) => self.functions.iter().find(|f| &f.name == n).map(|f| Grammar::Json(one(f))),
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
    /// the convention's system text and its forms of earlier calls and results.
    pub fn messages(tools: Option<&Tools>, messages: &[Message], template_renders_tools: bool) -> Vec<Message> {
        if template_renders_tools {
            return messages.to_vec();
        }
        let mut out: Vec<Message> = messages.iter().map(|m| plain(m, messages)).collect();
        if let Some(t) = tools {
            match out.first_mut() {
                Some(m) if m.role == "system" => {
                    m.content.push_str("\n\n");
                    m.content.push_str(&t.instructions());
                }
                _ => out.insert(0, Message::system(t.instructions())),
            }
        }
        out
    }

    /// The calls `text` (a whole answer) makes, if it is nothing but calls of listed functions.
    pub fn calls(&self, text: &str) -> Option<Vec<Call>> {
        let t = text.trim();
        let t = t.strip_prefix("<tool_call>").and_then(|t| t.strip_suffix("</tool_call>")).map_or(t, str::trim);
        let v: Value = serde_json::from_str(t).ok()?;
        let list = match v {
            Value::Array(list) if !list.is_empty() => list,
            v @ Value::Object(_) => vec![v],
            _ => return None,
        };
        list.iter()
            .map(|c| {
                let name = c.get("name")?.as_str()?;
                let arguments = c.get("arguments").filter(|a| a.is_object())?;
                let listed = self.functions.iter().any(|f| f.name == name);
                let allowed = match &self.choice {
                    ToolChoice::Named(n) => n == name,
                    _ => true,
                };
                (listed && allowed && c.as_object()?.len() == 2).then(|| Call { name: name.to_string(), arguments: arguments.to_string() })
            })
            .collect()
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
/// them (`index`).
pub fn wire_calls(calls: &[Call], streamed: bool) -> Value {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let list: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let id = format!("call_{nanos:x}{:04x}", NEXT.fetch_add(1, Ordering::Relaxed));
            let mut call = json!({ "id": id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } });
            if streamed {
                call["index"] = json!(index);
            }
            call
        })
        .collect();
    Value::Array(list)
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
        for text in [r#"{"name": "later", "arguments": {}}"#, r#"{"name": "now"}"#, r#"{"name": "now", "arguments": {}, "x": 1}"#, "It is sunny.", "{"] {
            assert_eq!(t.calls(text), None, "{text}");
        }
        let named = tools(json!({ "type": "function", "function": { "name": "now" } }));
        assert_eq!(named.calls(r#"{"name": "get_weather", "arguments": {}}"#), None, "only the named function");
        assert!(t.may_be_call("  {\"na") && t.may_be_call("<tool") && t.may_be_call(""));
        assert!(!t.may_be_call("The weather") && named.may_be_call("The"));
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
        let out = Tools::messages(Some(&t), &history, false);
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.contains(r#""name":"get_weather""#) && out[0].content.ends_with("Answer with a function call."), "{}", out[0].content);
        assert_eq!(out[2].content, r#"{"name": "get_weather", "arguments": {"city":"Paris"}}"#);
        assert_eq!((out[3].role.as_str(), out[3].content.as_str()), ("user", "Result of get_weather: 18 C"));
        assert_eq!(Tools::messages(Some(&t), &history, true), history, "a template that renders tools gets them as sent");
        assert!(sent_calls("p", &json!([{ "function": { "name": "a", "arguments": "{oops" } }])).is_err());
    }
}
