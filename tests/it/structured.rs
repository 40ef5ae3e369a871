//! Structured output and tool calls through `expanse serve`: every answer under a JSON schema parses
//! and validates (checked by an independent validator, the `jsonschema` crate), sampled at
//! temperature 1 on the tiny random model, which left alone writes no JSON at all; required and
//! named tool calls come back as OpenAI's `tool_calls`, whole and streamed.

use serde_json::{json, Value};

use super::common::schema_valid as valid;
use super::serve::{stream_chunks, Server, TINY};

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

/// The test set: bounded schemas (every string, array and number has a limit), so a complete answer
/// fits the tiny model's context whatever it samples.
fn schemas() -> Vec<Value> {
    vec![
        json!({ "type": "object", "properties": { "city": { "type": "string", "maxLength": 12 } }, "required": ["city"], "additionalProperties": false }),
        json!({ "type": "object", "properties": { "n": { "type": "integer", "minimum": -5, "maximum": 300 }, "ok": { "type": "boolean" } }, "required": ["n", "ok"], "additionalProperties": false }),
        json!({ "type": "object", "properties": { "color": { "enum": ["red", "green", "blue"] }, "tags": { "type": "array", "items": { "type": "string", "maxLength": 6 }, "maxItems": 3 } }, "required": ["color", "tags"], "additionalProperties": false }),
        json!({ "type": "object", "properties": { "who": { "type": "object", "properties": { "name": { "type": "string", "maxLength": 8 }, "age": { "type": "integer", "minimum": 0, "maximum": 120 } }, "required": ["name", "age"], "additionalProperties": false } }, "required": ["who"], "additionalProperties": false }),
        json!({ "anyOf": [{ "type": "object", "properties": { "yes": { "const": true } }, "required": ["yes"], "additionalProperties": false }, { "type": "array", "items": { "type": "integer", "minimum": 0, "maximum": 9 }, "minItems": 1, "maxItems": 4 }] }),
        json!({ "type": "object", "properties": { "answer": { "type": "string", "pattern": "^[a-z]{1,10}$" } }, "required": ["answer"], "additionalProperties": false }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_answers_always_parse_and_validate() {
    let s = Server::start(TINY, &[], None).await;
    // Unconstrained, the random model's answer is no JSON: the constraint is what makes it parse.
    let free = s.ok("/v1/chat/completions", &json!({ "messages": user("City?"), "max_tokens": 40, "temperature": 1.0, "seed": 1 })).await;
    assert!(serde_json::from_str::<Value>(free["choices"][0]["message"]["content"].as_str().unwrap()).is_err(), "{free}");
    let mut answers = 0;
    for (i, schema) in schemas().iter().enumerate() {
        for seed in 0..5u64 {
            let format = json!({ "type": "json_schema", "json_schema": { "name": format!("s{i}"), "schema": schema, "strict": true } });
            let body = json!({ "messages": user("Answer in JSON."), "max_tokens": 180, "temperature": 1.0, "seed": seed, "response_format": format });
            let v = s.ok("/v1/chat/completions", &body).await;
            let choice = &v["choices"][0];
            assert_eq!(choice["finish_reason"], "stop", "schema {i} seed {seed}: {v}");
            let text = choice["message"]["content"].as_str().unwrap();
            let answer: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("schema {i} seed {seed}: {e}: {text:?}"));
            assert!(valid(schema, &answer), "schema {i} seed {seed}: {answer} does not validate against {schema}");
            answers += 1;
        }
    }
    assert_eq!(answers, 30);
    // json_object: any object; on completions too (llama-server takes response_format there).
    for seed in 0..3u64 {
        let body =
            json!({ "messages": user("JSON please"), "max_tokens": 120, "temperature": 0.7, "seed": seed, "response_format": { "type": "json_object" } });
        let v = s.ok("/v1/chat/completions", &body).await;
        let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        // An open object may run to max_tokens (any object has no bound); a finished one parses.
        if v["choices"][0]["finish_reason"] == "stop" {
            assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text}");
        } else {
            assert!(text.trim_start().starts_with('{'), "{text}");
        }
    }
    let schema = &schemas()[1];
    let body = json!({ "prompt": "Q:", "max_tokens": 100, "temperature": 1.0, "seed": 3, "response_format": { "type": "json_schema", "json_schema": { "schema": schema } } });
    let v = s.ok("/v1/completions", &body).await;
    assert!(valid(schema, &serde_json::from_str(v["choices"][0]["text"].as_str().unwrap()).unwrap()), "{v}");
    // Streamed, the same seed writes the same answer.
    let body = json!({ "messages": user("Answer in JSON."), "max_tokens": 180, "temperature": 1.0, "seed": 4, "response_format": { "type": "json_schema", "json_schema": { "schema": schemas()[2] } } });
    let whole = s.ok("/v1/chat/completions", &body).await["choices"][0]["message"]["content"].clone();
    let chunks = stream_chunks(&s, "/v1/chat/completions", &body).await;
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(json!(streamed), whole);
    // What the grammar engine cannot take is the request's fault, named.
    for (format, param) in [
        (
            json!({ "type": "json_schema", "json_schema": { "schema": { "type": "object", "properties": { "a": { "$ref": "#/nowhere" } }, "required": ["a"] } } }),
            "response_format",
        ),
        (json!({ "type": "json_schema", "json_schema": { "name": "x" } }), "response_format.json_schema.schema"),
        (json!({ "type": "yaml" }), "response_format"),
    ] {
        let r = s.post("/v1/chat/completions", &json!({ "messages": user("x"), "response_format": format })).await;
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{e}");
    }
}

fn weather_tools() -> Value {
    json!([
        { "type": "function", "function": { "name": "get_weather", "description": "Weather now",
          "parameters": { "type": "object", "properties": { "city": { "type": "string", "maxLength": 6 } }, "required": ["city"], "additionalProperties": false } } },
        { "type": "function", "function": { "name": "get_time", "parameters": { "type": "object", "properties": { "zone": { "type": "integer", "minimum": -12, "maximum": 12 } }, "required": ["zone"], "additionalProperties": false } } },
    ])
}

/// A call's arguments, checked against its function's schema.
fn check_call(call: &Value, want: Option<&str>) -> String {
    let name = call["function"]["name"].as_str().unwrap().to_string();
    if let Some(w) = want {
        assert_eq!(name, w);
    }
    let id = call["id"].as_str().unwrap();
    assert!(id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) && call["type"] == "function", "{call}");
    let tools = weather_tools();
    let f = tools.as_array().unwrap().iter().find(|t| t["function"]["name"] == name.as_str()).unwrap();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(valid(&f["function"]["parameters"], &args), "{args}");
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_required_named_streamed_and_answered() {
    let s = Server::start(TINY, &[], None).await;
    let ask = |choice: Value, seed: u64| json!({ "messages": user("Weather in Paris?"), "tools": weather_tools(), "tool_choice": choice, "max_tokens": 64, "temperature": 1.0, "seed": seed });
    for seed in 0..4u64 {
        let v = s.ok("/v1/chat/completions", &ask(json!("required"), seed)).await;
        let choice = &v["choices"][0];
        assert_eq!((&choice["finish_reason"], &choice["message"]["content"]), (&json!("tool_calls"), &Value::Null), "{v}");
        check_call(&choice["message"]["tool_calls"][0], None);
        let named = s.ok("/v1/chat/completions", &ask(json!({ "type": "function", "function": { "name": "get_time" } }), seed)).await;
        check_call(&named["choices"][0]["message"]["tool_calls"][0], Some("get_time"));
    }
    // Streamed: one delta carries the whole call (id, name, arguments), then finish_reason tool_calls.
    let mut body = ask(json!("required"), 7);
    let whole = s.ok("/v1/chat/completions", &body).await["choices"][0]["message"]["tool_calls"][0].clone();
    body["stream"] = json!(true);
    let chunks = stream_chunks(&s, "/v1/chat/completions", &body).await;
    let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0]["index"], 0);
    assert_eq!((&calls[0]["function"], check_call(calls[0], None)), (&whole["function"], whole["function"]["name"].as_str().unwrap().to_string()));
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("").is_empty()), "no text beside the call");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    // auto: the random model answers in text; streamed, the held-back text comes out whole.
    let auto = json!({ "messages": user("Hello"), "tools": weather_tools(), "max_tokens": 12, "temperature": 0 });
    let v = s.ok("/v1/chat/completions", &auto).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(v["choices"][0]["message"].get("tool_calls").is_none() && v["choices"][0]["finish_reason"] != "tool_calls", "{v}");
    let mut streamed = auto.clone();
    streamed["stream"] = json!(true);
    let chunks = stream_chunks(&s, "/v1/chat/completions", &streamed).await;
    assert_eq!(chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<String>(), text);
    // The call and its result sent back: a new answer, the conversation accepted in OpenAI's shape.
    let history = json!([
        { "role": "user", "content": "Weather in Paris?" },
        { "role": "assistant", "content": null, "tool_calls": [whole] },
        { "role": "tool", "tool_call_id": whole["id"], "content": "18 C, sunny" },
    ]);
    let v = s.ok("/v1/chat/completions", &json!({ "messages": history, "tools": weather_tools(), "max_tokens": 5 })).await;
    assert!(v["choices"][0]["message"]["content"].is_string() || v["choices"][0]["message"]["tool_calls"].is_array(), "{v}");
    let without = s.ok("/v1/chat/completions", &json!({ "messages": user("Weather in Paris?"), "max_tokens": 1 })).await;
    let with = s.ok("/v1/chat/completions", &json!({ "messages": history, "tools": weather_tools(), "max_tokens": 1 })).await;
    assert!(with["usage"]["prompt_tokens"].as_u64() > without["usage"]["prompt_tokens"].as_u64(), "the functions, the call and its result are in the prompt");
    // tool_choice naming a function `tools` does not list is a 400 naming it.
    let r = s.post("/v1/chat/completions", &ask(json!({ "type": "function", "function": { "name": "nope" } }), 0)).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "tool_choice");
}

/// `generate --json-schema` / `--json-schema-file`: the answer validates; a schema that is no schema,
/// or that llguidance cannot compile, exits 2 naming the flag.
#[test]
fn generate_follows_a_json_schema_from_the_command_line() {
    use super::common::{expanse, fixture};
    let model = fixture(TINY);
    let schema = &schemas()[3];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("schema.json");
    std::fs::write(&file, schema.to_string()).unwrap();
    for (flag, value) in [("--json-schema", schema.to_string()), ("--json-schema-file", file.display().to_string())] {
        for seed in ["1", "2"] {
            let out = expanse(&[
                "generate",
                "--model",
                &model,
                "--prompt",
                "Who?",
                flag,
                &value,
                "--temperature",
                "1",
                "--seed",
                seed,
                "--max-tokens",
                "150",
                "--json",
            ]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let result: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(result["stop"], "eos", "{result}");
            let answer: Value = serde_json::from_str(result["text"].as_str().unwrap()).unwrap();
            assert!(valid(schema, &answer), "{answer}");
        }
    }
    for (value, says) in
        [("[1]", "expected a JSON schema"), ("{oops", "not JSON"), (r##"{"type": "object", "properties": {"a": {"$ref": "#/x"}}, "required": ["a"]}"##, "/x")]
    {
        let out = expanse(&["generate", "--model", &model, "--prompt", "Who?", "--json-schema", value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--json-schema") && err.contains(says), "{err}");
    }
}

/// What an adversarial review found (each case failed before its fix): a function's `$defs`, open
/// parameters, stop strings beside a grammar, a grammar too large for the parser, held-back text that
/// is no call, and a template that refuses a system message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grammars_hold_at_their_edges() {
    let s = Server::start(TINY, &[], None).await;
    let nested = json!({ "$defs": { "Loc": { "type": "object", "properties": { "city": { "type": "string", "maxLength": 5 } }, "required": ["city"], "additionalProperties": false } },
                         "type": "object", "properties": { "loc": { "$ref": "#/$defs/Loc" } }, "required": ["loc"], "additionalProperties": false });
    let tools = json!([{ "type": "function", "function": { "name": "where", "parameters": nested } }, { "type": "function", "function": { "name": "ping", "parameters": {} } }]);
    for (choice, name) in
        [(json!({ "type": "function", "function": { "name": "where" } }), "where"), (json!({ "type": "function", "function": { "name": "ping" } }), "ping")]
    {
        for seed in 0..3u64 {
            let body = json!({ "messages": user("Where?"), "tools": tools, "tool_choice": choice, "max_tokens": 64, "temperature": 1.0, "seed": seed });
            let v = s.ok("/v1/chat/completions", &body).await;
            let (choice, call) = (&v["choices"][0], &v["choices"][0]["message"]["tool_calls"][0]);
            if name == "ping" && choice["finish_reason"] == "length" {
                // Open parameters are any object: unbounded, so the random model may run out of
                // room; its arguments still open as an object, never another value.
                let text = choice["message"]["content"].as_str().unwrap();
                let after = text.split("\"arguments\"").nth(1).unwrap_or_else(|| panic!("{v}"));
                assert!(after.trim_start().trim_start_matches(':').trim_start().starts_with('{'), "{v}");
                continue;
            }
            assert_eq!((&choice["finish_reason"], &call["function"]["name"]), (&json!("tool_calls"), &json!(name)), "{v}");
            let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(args.is_object() && (name == "ping" || valid(&nested, &args)), "{args}");
        }
    }
    // Parameters with an `$id` of their own resolve their refs against it.
    let own = json!({ "$id": "urn:p", "$defs": { "L": { "type": "string", "maxLength": 4 } }, "type": "object", "properties": { "x": { "$ref": "#/$defs/L" } }, "required": ["x"], "additionalProperties": false });
    let body = json!({ "messages": user("x?"), "tools": [{ "type": "function", "function": { "name": "idd", "parameters": own } }], "tool_choice": "required", "max_tokens": 60, "temperature": 1.0, "seed": 1 });
    let v = s.ok("/v1/chat/completions", &body).await;
    let args: Value =
        serde_json::from_str(v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap_or_else(|| panic!("{v}"))).unwrap();
    assert!(valid(&own, &args), "{args}");
    // A stop string cannot cut a constrained answer short of parsing.
    let schema = &schemas()[0];
    let body = json!({ "messages": user("City?"), "max_tokens": 150, "temperature": 1.0, "seed": 2, "stop": ["\"", "city"], "response_format": { "type": "json_schema", "json_schema": { "schema": schema } } });
    let v = s.ok("/v1/chat/completions", &body).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(valid(schema, &serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap()), "{v}");
    // Too large for the parser: the request's fault, in one line, without the parser's state.
    let many: Vec<Value> =
        (0..3000).map(|i| json!({ "type": "object", "properties": { format!("k{i}"): { "type": "integer" } }, "required": [format!("k{i}")] })).collect();
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({ "messages": user("x"), "response_format": { "type": "json_schema", "json_schema": { "schema": { "anyOf": many } } } }),
        )
        .await;
    let status = r.status();
    let e: Value = r.json().await.unwrap();
    assert_eq!(status, 400, "{e}");
    // (It compiles, and its first token's mask too: the parser's row limit is met a token later, in
    // the worker, which answers 400 as well.)
    assert!(e["error"]["type"] == "invalid_request_error" && !e["error"]["message"].as_str().unwrap().contains("<state>"), "{e}");
    // JSON that is no call, with tools offered: streamed, the held-back text comes out whole.
    let body = json!({ "messages": user("JSON"), "tools": weather_tools(), "max_tokens": 30, "temperature": 1.0, "seed": 3, "response_format": { "type": "json_object" } });
    let whole = s.ok("/v1/chat/completions", &body).await;
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.starts_with('{') && whole["choices"][0]["message"].get("tool_calls").is_none(), "{whole}");
    let chunks = stream_chunks(&s, "/v1/chat/completions", &json!({ "messages": user("JSON"), "tools": weather_tools(), "max_tokens": 30, "temperature": 1.0, "seed": 3, "response_format": { "type": "json_object" } })).await;
    assert_eq!(chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<String>(), text);
    drop(s);
    // A template that refuses a system message and wants roles to alternate (Gemma's rules).
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("strict.jinja");
    let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
               {% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}\
               <{{ m.role }}>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    std::fs::write(&template, src).unwrap();
    let s = Server::start(TINY, &["--chat-template", template.to_str().unwrap()], None).await;
    let v = s.ok("/v1/chat/completions", &json!({ "messages": user("Weather in Paris?"), "tools": weather_tools(), "tool_choice": "required", "max_tokens": 64, "temperature": 1.0, "seed": 1 })).await;
    check_call(&v["choices"][0]["message"]["tool_calls"][0], None);
    let call = v["choices"][0]["message"]["tool_calls"][0].clone();
    let results = json!([
        { "role": "user", "content": "Weather in Paris?" },
        { "role": "assistant", "content": null, "tool_calls": [call] },
        { "role": "tool", "tool_call_id": call["id"], "content": "18 C" },
        { "role": "tool", "tool_call_id": "other", "content": "rain" },
    ]);
    s.ok("/v1/chat/completions", &json!({ "messages": results, "tools": weather_tools(), "max_tokens": 4 })).await;
}
