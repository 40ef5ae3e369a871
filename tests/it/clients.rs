//! The requests the `openai` SDK and langchain-openai send, replayed: tests/fixtures/record_clients.py
//! ran those clients live against `expanse serve` (their own parsing of every answer checked there)
//! and recorded each request exactly; here each is sent again and its answer's shape checked the way
//! those clients read it, so CI needs no Python.

use serde_json::{json, Value};

use super::common::schema_valid as valid;
use super::serve::{sse_events, Server, TINY};

fn records() -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clients/requests.jsonl");
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A request's functions: (name, parameters' schema).
type Functions = Vec<(String, Value)>;

/// The function a request forces (`tool_choice` required: any; or the one named), and its functions.
fn forced(body: &Value) -> Option<(Option<String>, Functions)> {
    let tools: Vec<(String, Value)> =
        body["tools"].as_array()?.iter().map(|t| (t["function"]["name"].as_str().unwrap().to_string(), t["function"]["parameters"].clone())).collect();
    match &body["tool_choice"] {
        Value::String(s) if s == "required" => Some((None, tools)),
        Value::Object(o) => Some((o["function"]["name"].as_str().map(str::to_string), tools)),
        _ => None,
    }
}

/// A chat answer's message as a client assembles it: `(content, tool_calls)`.
fn check_message(client: &str, body: &Value, message: &Value, finish: &str) {
    assert_eq!(message["role"], "assistant", "{client}");
    if let Some((name, tools)) = forced(body) {
        assert_eq!((finish, &message["content"]), ("tool_calls", &Value::Null), "{client}: {message}");
        let calls = message["tool_calls"].as_array().unwrap();
        for call in calls {
            let called = call["function"]["name"].as_str().unwrap();
            assert!(name.as_deref().is_none_or(|n| n == called), "{client}: {call}");
            let (_, schema) = tools.iter().find(|(n, _)| n == called).unwrap_or_else(|| panic!("{client}: unlisted {called}"));
            let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(valid(schema, &args), "{client}: {args} against {schema}");
            let id = call["id"].as_str().unwrap();
            assert!(id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) && call["type"] == "function", "{client}: {call}");
        }
        return;
    }
    let text = message["content"].as_str().unwrap_or_else(|| panic!("{client}: no text: {message}"));
    match body["response_format"]["type"].as_str() {
        Some("json_schema") => {
            assert_eq!(finish, "stop", "{client}");
            let schema = &body["response_format"]["json_schema"]["schema"];
            assert!(valid(schema, &serde_json::from_str(text).unwrap()), "{client}: {text}");
        }
        Some("json_object") if finish == "stop" => assert!(serde_json::from_str::<Value>(text).unwrap().is_object(), "{client}: {text}"),
        Some("json_object") => assert!(text.starts_with('{'), "{client}: {text}"),
        _ => {}
    }
}

fn check_usage(client: &str, usage: &Value) {
    let n = |k: &str| usage[k].as_u64().unwrap_or_else(|| panic!("{client}: usage.{k}: {usage}"));
    assert!(n("completion_tokens") > 0 && n("prompt_tokens") > 0, "{client}");
    assert_eq!(n("total_tokens"), n("prompt_tokens") + n("completion_tokens"), "{client}");
}

fn check_whole(client: &str, path: &str, body: &Value, v: &Value) {
    let chat = path.ends_with("chat/completions");
    assert_eq!(v["object"], if chat { "chat.completion" } else { "text_completion" }, "{client}");
    assert!(v["id"].is_string() && v["created"].is_u64() && v["model"] == body["model"], "{client}: {v}");
    check_usage(client, &v["usage"]);
    let choice = &v["choices"][0];
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(["stop", "length", "tool_calls"].contains(&finish), "{client}: {finish}");
    if chat {
        check_message(client, body, &choice["message"], finish);
    } else {
        assert!(choice["text"].is_string(), "{client}");
    }
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    match (&body["logprobs"], chat) {
        (Value::Bool(true), true) => {
            let content = choice["logprobs"]["content"].as_array().unwrap();
            let top = body["top_logprobs"].as_u64().unwrap_or(0) as usize;
            assert_eq!(content.len(), completion, "{client}");
            assert!(content.iter().all(|t| t["token"].is_string() && t["logprob"].is_f64() && t["top_logprobs"].as_array().unwrap().len() == top), "{client}");
        }
        (Value::Number(k), false) => {
            let lp = &choice["logprobs"];
            assert_eq!(lp["tokens"].as_array().unwrap().len(), completion, "{client}");
            let k = k.as_u64().unwrap() as usize;
            assert!(lp["top_logprobs"].as_array().unwrap().iter().all(|t| t.as_object().unwrap().len() >= k), "{client}");
        }
        _ => assert!(choice["logprobs"].is_null(), "{client}"),
    }
}

/// A stream as a client assembles it: chunks of the right object, one choice's deltas, a finish, the
/// usage chunk when asked for, `[DONE]`.
fn check_stream(client: &str, path: &str, body: &Value, events: &[String]) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{client}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let chat = path.ends_with("chat/completions");
    let (mut text, mut calls, mut finish) = (String::new(), Vec::new(), None);
    for c in &chunks {
        assert_eq!(c["object"], if chat { "chat.completion.chunk" } else { "text_completion" }, "{client}");
        let Some(choice) = c["choices"].as_array().and_then(|l| l.first()) else { continue };
        let d = if chat { &choice["delta"] } else { choice };
        text.push_str(d[if chat { "content" } else { "text" }].as_str().unwrap_or(""));
        calls.extend(d["tool_calls"].as_array().into_iter().flatten().cloned());
        if let Some(f) = choice["finish_reason"].as_str() {
            assert!(finish.replace(f.to_string()).is_none(), "{client}: one finish");
        }
    }
    let finish = finish.unwrap_or_else(|| panic!("{client}: no finish_reason"));
    if body["stream_options"]["include_usage"] == true {
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]), "{client}");
        check_usage(client, &last["usage"]);
    }
    if chat {
        assert!(calls.is_empty() || text.is_empty(), "{client}: text beside a call: {text:?}");
        let content = if calls.is_empty() { json!(text) } else { Value::Null };
        let message = json!({ "role": "assistant", "content": content, "tool_calls": calls });
        check_message(client, body, &message, &finish);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requests_openai_and_langchain_send_get_answers_they_read() {
    let records = records();
    let clients: std::collections::BTreeSet<&str> = records.iter().map(|r| r["client"].as_str().unwrap()).collect();
    for want in [
        "openai parse json_schema",
        "openai tools",
        "langchain stream",
        "langchain batch",
        "langchain structured json_schema",
        "langchain structured function_calling",
        "langchain structured json_mode",
        "langchain bind_tools",
        "langchain tool answer",
    ] {
        assert!(clients.contains(want), "the recording has {want}");
    }
    let s = Server::start(TINY, &["--alias", "tiny"], None).await;
    for r in &records {
        let (client, path, body) = (r["client"].as_str().unwrap(), r["path"].as_str().unwrap(), &r["body"]);
        assert_eq!(r["method"], "POST");
        let resp = s.post(path, body).await;
        assert_eq!(resp.status(), 200, "{client}: {}", s.log());
        if body["stream"] == true {
            check_stream(client, path, body, &sse_events(resp).await);
        } else {
            check_whole(client, path, body, &resp.json().await.unwrap());
        }
    }
}
