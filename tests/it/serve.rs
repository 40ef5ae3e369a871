//! `expanse serve`: the real binary on an ephemeral 127.0.0.1 port, against `expanse generate`, a real
//! SSE parser, OpenAI's error table, concurrent clients, disconnects, auth, CORS and signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use expanse::stream::TextStream;
use expanse::tokenizer::Tokenizer;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

pub(super) const TINY: &str = "tiny-mistral-f32";

/// A running `expanse serve`, killed when dropped.
pub(super) struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
    http: reqwest::Client,
    key: Option<String>,
}

impl Server {
    /// Starts `expanse serve --model DIR --port 0 ARGS` and waits until `/health` answers 200.
    pub(super) async fn start(model: &str, args: &[&str], key: Option<&str>) -> Server {
        Server::start_env(model, args, key, &[]).await
    }

    async fn start_env(model: &str, args: &[&str], key: Option<&str>, env: &[(&str, &str)]) -> Server {
        Server::launch(serve_command(model, args, key, env), key).await
    }

    /// The server with at most `fds` file descriptors (`ulimit -n`).
    async fn start_with_fds(model: &str, args: &[&str], fds: u64) -> Server {
        use std::os::unix::process::CommandExt;
        let mut c = serve_command(model, args, None, &[]);
        // SAFETY: between fork and exec the closure only calls setrlimit, which is async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: fds, rlim_max: fds };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Server::launch(c, None).await
    }

    async fn launch(mut c: std::process::Command, key: Option<&str>) -> Server {
        let mut child = c.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1).and_then(|a| a.split_whitespace().next()) {
                    let _ = tx.send(addr.to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no address: {}", log.lock().unwrap()));
        assert!(base.starts_with("http://127.0.0.1:"), "binds 127.0.0.1 by default: {base}");
        let s = Server { child, base, log, http: reqwest::Client::new(), key: key.map(str::to_string) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.get("/health").await.status() != StatusCode::OK {
            assert!(Instant::now() < deadline, "never healthy: {}", s.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s
    }

    pub(super) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn authed(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.authed(self.http.get(format!("{}{path}", self.base))).send().await.unwrap()
    }

    pub(super) async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.authed(self.http.post(format!("{}{path}", self.base)).json(body)).send().await.unwrap()
    }

    /// A non-streamed answer's JSON, asserting 200.
    pub(super) async fn ok(&self, path: &str, body: &Value) -> Value {
        let r = self.post(path, body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    /// One value of the Prometheus text at `/metrics` (0 when the series is absent).
    async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// host:port, for raw connections.
    fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// The exit status if the process ends within `limit`.
    fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `expanse serve --model DIR --port 0 ARGS` with its stderr piped for `Server::launch`.
fn serve_command(model: &str, args: &[&str], key: Option<&str>, env: &[(&str, &str)]) -> std::process::Command {
    let dir = if model.starts_with('/') { model.to_string() } else { fixture(model) };
    let mut c = command(&["serve", "--model", &dir, "--device", "cpu", "--port", "0"]);
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped()).env_remove("EXPANSE_API_KEY").envs(env.iter().copied());
    if let Some(k) = key {
        c.env("EXPANSE_API_KEY", k);
    }
    c
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The events of an SSE answer as a real SSE client library parses them: (data of each event).
pub(super) async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut events = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(e) = events.next().await {
        let e = e.expect("well-formed SSE");
        assert!(e.event.is_empty() || e.event == "message", "unnamed events only: {e:?}");
        out.push(e.data);
    }
    out
}

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

/// `expanse generate --json` for the same prompt: (text, generated ids, stop).
fn generate(prompt: &str, extra: &[&str]) -> (String, Vec<u32>, String) {
    let model = fixture(TINY);
    let mut args = vec!["generate", "--model", &model, "--device", "cpu", "--prompt", prompt, "--json"];
    args.extend_from_slice(extra);
    let out = expanse(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = v["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    (v["text"].as_str().unwrap().to_string(), ids, v["stop"].as_str().unwrap().to_string())
}

/// The text pieces a stream of `ids` releases token by token, then what `finish` releases.
fn pieces(ids: &[u32]) -> (Vec<String>, String) {
    let tok = Tokenizer::from_file(&fixtures().join(TINY).join("tokenizer.json")).unwrap();
    let mut s = TextStream::new(&tok, vec![]);
    let p = ids.iter().map(|&id| s.push(id).unwrap()).collect();
    (p, s.finish().unwrap())
}

fn finish_of(stop: &str) -> &'static str {
    if stop == "max_tokens" || stop == "context_full" {
        "length"
    } else {
        "stop"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_equal_generate_token_for_token() {
    let s = Server::start(TINY, &[], None).await;
    let cases: [(&str, &[&str], Value); 2] = [
        ("Hello there", &["--temperature", "0"], json!({ "temperature": 0 })),
        ("Tell me a story 🙂", &["--temperature", "0.9", "--seed", "7"], json!({ "temperature": 0.9, "seed": 7 })),
    ];
    for (prompt, flags, fields) in cases {
        for endpoint in ["chat", "completions"] {
            let mut flags = flags.to_vec();
            flags.extend(["--max-tokens", "24"]);
            let (path, mut body) = if endpoint == "chat" {
                ("/v1/chat/completions", json!({ "model": fixture(TINY), "messages": user(prompt) }))
            } else {
                flags.push("--raw");
                ("/v1/completions", json!({ "prompt": prompt }))
            };
            let (text, ids, stop) = generate(prompt, &flags);
            for (k, v) in fields.as_object().unwrap() {
                body[k] = v.clone();
            }
            body["max_tokens"] = json!(24);
            let at = format!("{endpoint} {prompt:?} {fields}");

            let whole = s.ok(path, &body).await;
            let choice = &whole["choices"][0];
            let got = if endpoint == "chat" { &choice["message"]["content"] } else { &choice["text"] };
            assert_eq!(got.as_str().unwrap(), text, "{at}");
            assert_eq!(choice["finish_reason"], finish_of(&stop), "{at}");
            assert_eq!(whole["usage"]["completion_tokens"], ids.len(), "{at}");
            assert_eq!(whole["object"], if endpoint == "chat" { "chat.completion" } else { "text_completion" });

            body["stream"] = json!(true);
            body["stream_options"] = json!({ "include_usage": true });
            let events = sse_events(s.post(path, &body).await).await;
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{at}");
            let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
            let usage = chunks.last().unwrap();
            assert_eq!(usage["choices"], json!([]), "{at}");
            assert_eq!(usage["usage"]["completion_tokens"], ids.len());
            assert_eq!(usage["usage"]["total_tokens"], usage["usage"]["prompt_tokens"].as_u64().unwrap() + ids.len() as u64);
            let mut body_chunks = &chunks[..chunks.len() - 1];
            if endpoint == "chat" {
                assert_eq!(body_chunks[0]["choices"][0]["delta"], json!({ "role": "assistant", "content": "" }), "{at}");
                body_chunks = &body_chunks[1..];
            }
            let (last, tokens) = body_chunks.split_last().unwrap();
            assert_eq!(last["choices"][0]["finish_reason"], finish_of(&stop), "{at}");
            let piece = |c: &Value| {
                let ch = &c["choices"][0];
                assert!(ch["finish_reason"].is_null());
                assert_eq!(c["object"], if endpoint == "chat" { "chat.completion.chunk" } else { "text_completion" });
                (if endpoint == "chat" { &ch["delta"]["content"] } else { &ch["text"] }).as_str().unwrap().to_string()
            };
            let streamed: Vec<String> = tokens.iter().map(piece).collect();
            // One chunk per generated token, each with the text that token released; then the held-back rest.
            let (want, rest) = pieces(&ids);
            assert_eq!(streamed[..ids.len()], want[..], "{at}");
            assert_eq!(streamed[ids.len()..].concat(), rest, "{at}");
            assert_eq!(streamed.concat(), text, "{at}");
            assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]), "one id per answer");
        }
    }
}

/// `--alias` names the model for clients (listed first, answered under the name asked for), and
/// `/tokenize`/`/detokenize` answer as llama-server's do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_and_tokenize_through_the_server() {
    let s = Server::start(TINY, &["--alias", "openchat", "--alias", "gpt-3.5-turbo"], None).await;
    let models = s.get("/v1/models").await.json::<Value>().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["openchat", "gpt-3.5-turbo", fixture(TINY).as_str()]);
    let v = s.ok("/v1/chat/completions", &json!({ "model": "gpt-3.5-turbo", "messages": user("Hi"), "max_tokens": 2 })).await;
    assert_eq!(v["model"], "gpt-3.5-turbo", "the answer carries the name asked for");
    let v = s.ok("/v1/completions", &json!({ "prompt": "Hi", "max_tokens": 2 })).await;
    assert_eq!(v["model"], "openchat", "no name asked for: the first");
    // logit_bias: +100 on one token makes a greedy answer that token throughout; an id past the
    // vocabulary is a 400 naming the field.
    let v = s.ok("/v1/completions", &json!({ "prompt": "Hi", "max_tokens": 3, "temperature": 0, "logit_bias": { "22557": 100 } })).await;
    assert_eq!(v["choices"][0]["text"], "Hello Hello Hello", "{v}");
    let r = s.post("/v1/completions", &json!({ "prompt": "Hi", "logit_bias": { "99999": 1 } })).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "logit_bias");
    // A prompt of token ids answers as its text does (the same ids, the same greedy answer).
    let by_text = s.ok("/v1/completions", &json!({ "prompt": "Hi there", "max_tokens": 4, "temperature": 0 })).await;
    let ids = s.ok("/tokenize", &json!({ "content": "Hi there", "add_special": true })).await["tokens"].clone();
    let by_ids = s.ok("/v1/completions", &json!({ "prompt": ids, "max_tokens": 4, "temperature": 0 })).await;
    assert_eq!(by_ids["choices"][0]["text"], by_text["choices"][0]["text"]);
    assert_eq!(by_ids["usage"]["prompt_tokens"], by_text["usage"]["prompt_tokens"]);
    let r = s.post("/v1/completions", &json!({ "prompt": [1, 99999] })).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let t = s.ok("/tokenize", &json!({ "content": "Hello", "add_special": true })).await;
    assert_eq!(t["tokens"], json!([1, 22557]));
    let d = s.ok("/detokenize", &json!({ "tokens": [22557] })).await;
    assert_eq!(d["content"], "Hello");
    let out = expanse(&["serve", "--model", &fixture(TINY), "--alias", " ", "--port", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--alias"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let s = Server::start(TINY, &[], None).await;
    let models = s.get("/v1/models").await.json::<Value>().await.unwrap();
    assert_eq!(models["data"][0]["id"], fixture(TINY));
    assert_eq!(s.get("/health").await.json::<Value>().await.unwrap()["status"], "ok");
    s.ok("/v1/chat/completions", &json!({ "messages": user("Hi"), "max_tokens": 3, "temperature": 0 })).await;
    let text = s.get("/metrics").await.text().await.unwrap();
    for series in [
        "expanse_requests_total{status=\"200\"}",
        "expanse_prompt_tokens_total",
        "expanse_generated_tokens_total 3",
        "expanse_queue_depth 0",
        "expanse_decode_tokens_per_second",
        "expanse_running_sequences 0",
        "expanse_decode_steps_total",
        "expanse_decode_step_tokens_total",
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_answer_and_a_repeated_prompt_reuses_the_cache() {
    let s = Server::start(TINY, &["--temperature", "0", "--prefill-chunk", "8"], None).await;
    let body = json!({ "messages": user("Hello"), "max_tokens": 20 });
    let full = s.ok("/v1/chat/completions", &body).await;
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // A stop string from the middle of the greedy answer: the text ends right before it.
    let cut = text.char_indices().map(|(i, _)| i).nth(text.chars().count() / 2).unwrap();
    let stop: String = text[cut..].chars().take(3).collect();
    let mut with_stop = body.clone();
    with_stop["stop"] = json!(["never-generated", stop]);
    let v = s.ok("/v1/chat/completions", &with_stop).await;
    let before = &text[..text.find(stop.as_str()).unwrap()];
    assert_eq!(v["choices"][0]["message"]["content"], before, "stop {stop:?} in {text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // The same 17-token prompt again, on the CPU with f32 weights (prompt positions are the same bits
    // in any chunk of two or more): all of it comes from the cache but its last two tokens, which
    // run again for the logits (one token alone would take the decode path).
    assert_eq!(v["usage"]["prompt_tokens"], 17);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 15);
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let model = fixture(TINY);
    let cases: [(&[&str], &str); 7] = [
        (&["--port", &port], "--host/--port"),
        (&["--parallel", "0"], "--parallel"),
        (&["--decode-path", "fused", "--parallel", "4"], "--decode-path"),
        (&["--api-key", ""], "--api-key"),
        (&["--cors", "bad\norigin"], "--cors"),
        (&["--prefill-chunk", "1"], "--prefill-chunk"),
        (&["--max-tokens", "50", "--max-tokens-cap", "10"], "--max-tokens"),
    ];
    for (args, flag) in cases {
        let mut all = vec!["serve", "--model", &model, "--device", "cpu"];
        all.extend_from_slice(args);
        let out = command(&all).env_remove("EXPANSE_API_KEY").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
}

async fn assert_error(r: reqwest::Response, status: u16, code: Option<&str>, param: Option<&str>, row: &str) {
    assert_eq!(r.status().as_u16(), status, "{row}");
    // A 503 says when to try again (the OpenAI SDK's retry honours it); nothing else carries it.
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    assert_eq!(retry.as_deref(), (status == 503).then_some("1"), "{row}: Retry-After");
    let v: Value = r.json().await.unwrap_or_else(|e| panic!("{row}: not JSON: {e}"));
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{row}: {v}");
    assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{row}: {v}");
    assert_eq!(e["code"].as_str(), code, "{row}: {v}");
    assert_eq!(e["param"].as_str(), param, "{row}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_table_one_case_per_row() {
    let key = "k-0123456789";
    // One slot: the queued request below stays queued while the first answer runs (with free slots
    // the worker takes it at its next step, and the 503 case raced that step: seen under load).
    let args = ["--parallel", "1", "--queue", "1", "--decode-delay-ms", "40", "--body-limit", "4096", "--max-tokens-cap", "100"];
    let s = Server::start(TINY, &args, Some(key)).await;
    let chat = format!("{}/v1/chat/completions", s.base);
    let hi = json!({ "messages": user("Hi"), "max_tokens": 2 });

    // 400: malformed JSON, a bad value, a field that would change the result, and an over-cap max_tokens.
    let raw = s.http.post(&chat).bearer_auth(key).header("content-type", "application/json").body("{\"messages\": [").send().await.unwrap();
    assert_error(raw, 400, None, None, "malformed JSON").await;
    assert_error(s.post("/v1/chat/completions", &json!({ "messages": user("Hi"), "temperature": "hot" })).await, 400, None, Some("temperature"), "bad value")
        .await;
    assert_error(s.post("/v1/chat/completions", &json!({ "messages": user("Hi"), "echo": true })).await, 400, None, Some("echo"), "unsupported value").await;
    assert_error(s.post("/v1/chat/completions", &json!({ "messages": user("Hi"), "max_tokens": 101 })).await, 400, None, Some("max_tokens"), "over the cap")
        .await;
    // 400 context_length_exceeded: a prompt longer than the fixture's 256-token context, and one that
    // fits but not with its max_tokens.
    let long = "word ".repeat(300);
    assert_error(s.post("/v1/chat/completions", &json!({ "messages": user(&long) })).await, 400, Some("context_length_exceeded"), Some("messages"), "context")
        .await;
    let fits = "word ".repeat(200);
    assert_error(
        s.post("/v1/completions", &json!({ "prompt": fits, "max_tokens": 90 })).await,
        400,
        Some("context_length_exceeded"),
        Some("max_tokens"),
        "context + max_tokens",
    )
    .await;
    // 401: no key and a wrong key (a key one byte short too); /health stays open.
    let none = s.http.post(&chat).json(&hi).send().await.unwrap();
    assert_error(none, 401, Some("invalid_api_key"), None, "no key").await;
    for wrong in ["k-0123456788", "k-012345678"] {
        let r = s.http.post(&chat).bearer_auth(wrong).json(&hi).send().await.unwrap();
        assert_error(r, 401, Some("invalid_api_key"), None, "wrong key").await;
    }
    assert!(!s.log().contains(key), "the key is never logged");
    assert_eq!(s.http.get(format!("{}/health", s.base)).send().await.unwrap().status(), StatusCode::OK);
    // 404: an unknown model and an unknown route.
    assert_error(
        s.post("/v1/chat/completions", &json!({ "model": "gpt-4", "messages": user("Hi") })).await,
        404,
        Some("model_not_found"),
        Some("model"),
        "model",
    )
    .await;
    assert_error(s.get("/v1/engines").await, 404, Some("not_found"), None, "route").await;
    // 413: a body over --body-limit.
    let big = json!({ "messages": user(&"x".repeat(5000)) });
    assert_error(s.post("/v1/chat/completions", &big).await, 413, Some("request_too_large"), None, "body").await;

    // 503: one answer running (slowed by --decode-delay-ms), one waiting in the queue of 1, a third refused.
    let running = s.post("/v1/chat/completions", &json!({ "messages": user("Hi"), "max_tokens": 100, "stream": true })).await;
    let mut running = running.bytes_stream().eventsource();
    running.next().await.unwrap().unwrap(); // the role chunk
    running.next().await.unwrap().unwrap(); // the first token: the worker is busy
    let queued = {
        let http = s.http.clone();
        let chat = chat.clone();
        tokio::spawn(async move { http.post(chat).bearer_auth(key).json(&json!({ "messages": user("Hi"), "max_tokens": 2 })).send().await.unwrap() })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("expanse_queue_depth").await < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_error(s.post("/v1/chat/completions", &hi).await, 503, Some("queue_full"), None, "queue full").await;
    drop(running);
    assert_eq!(queued.await.unwrap().status(), StatusCode::OK, "the queued request is answered once the first client leaves");
    assert!(s.metric("expanse_requests_total{status=\"503\"}").await >= 1.0);

    // 500: an internal failure in the worker (injected: expanse refuses NaN weights at load, so no model
    // can make one) — and the server answers afterwards.
    let nan = Server::start_env("tiny-mistral-bf16", &[], None, &[("EXPANSE_TEST_FAULT", "serve-worker")]).await;
    assert_error(
        nan.post("/v1/completions", &json!({ "prompt": "Hi", "max_tokens": 3, "temperature": 1 })).await,
        500,
        Some("internal_error"),
        None,
        "internal",
    )
    .await;
    assert_eq!(nan.get("/health").await.status(), StatusCode::OK);
    nan.ok("/v1/completions", &json!({ "prompt": "Hi", "max_tokens": 3, "temperature": 0 })).await;
}

/// One greedy chat answer of 10 tokens, streamed or not.
async fn ask(s: Arc<Server>, messages: Value, stream: bool) -> String {
    ask_on(&s, messages, stream).await
}

async fn ask_on(s: &Server, messages: Value, stream: bool) -> String {
    let body = json!({ "messages": messages, "max_tokens": 10, "stream": stream });
    if !stream {
        return s.ok("/v1/chat/completions", &body).await["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    }
    let events = sse_events(s.post("/v1/chat/completions", &body).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_five_requests_each_nothing_lost_greedy_identical() {
    let s = Arc::new(Server::start(TINY, &["--temperature", "0", "--prefill-chunk", "4"], None).await);
    // Five prompts, one a later turn of another's conversation (its prefix is in the cache).
    let mut prompts: Vec<Value> = ["Hello", "What is 2+2?", "Name a colour", "Write a haiku"].iter().map(|p| user(p)).collect();
    let first = s.ok("/v1/chat/completions", &json!({ "messages": prompts[0], "max_tokens": 10 })).await;
    let answer = first["choices"][0]["message"]["content"].as_str().unwrap();
    prompts.push(json!([{ "role": "user", "content": "Hello" }, { "role": "assistant", "content": answer }, { "role": "user", "content": "And then?" }]));
    let prompts = Arc::new(prompts);
    let mut alone = Vec::new();
    for p in prompts.iter() {
        alone.push(ask(s.clone(), p.clone(), false).await);
    }
    let before = s.metric("expanse_requests_total{status=\"200\"}").await;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (s, prompts) = (s.clone(), prompts.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for r in 0..5 {
                    let i = (c + r) % 5;
                    got.push((i, ask(s.clone(), prompts[i].clone(), (c + r) % 2 == 0).await));
                }
                got
            })
        })
        .collect();
    let mut answered = 0;
    for c in clients {
        for (i, text) in c.await.unwrap() {
            assert_eq!(text, alone[i], "prompt {i}: the same greedy answer with eight clients as with one");
            answered += 1;
        }
    }
    assert_eq!(answered, 40);
    let after = s.metric("expanse_requests_total{status=\"200\"}").await;
    assert_eq!(after - before, 41.0, "the 40 answers and the /metrics read before them, nothing lost");
    assert!(s.metric("expanse_cached_prompt_tokens_total").await > 0.0, "shared prefixes came from the KV cache");
}

/// One greedy completion with log-probabilities (functions of the logits' bits), streamed or not, as
/// (text, each token's logprob and top 3 as JSON text).
async fn scored(s: &Server, prompt: &str, stream: bool) -> (String, Vec<String>) {
    let body = json!({ "prompt": prompt, "max_tokens": 12, "logprobs": 3, "temperature": 0, "stream": stream });
    let choices: Vec<Value> = if stream {
        stream_chunks(s, "/v1/completions", &body).await.iter().map(|c| c["choices"][0].clone()).collect()
    } else {
        vec![s.ok("/v1/completions", &body).await["choices"][0].clone()]
    };
    let text = choices.iter().map(|c| c["text"].as_str().unwrap_or("")).collect();
    let lp = choices.iter().flat_map(|c| {
        let l = &c["logprobs"];
        let n = l["tokens"].as_array().map_or(0, |t| t.len());
        (0..n).map(move |i| format!("{} {} {}", l["tokens"][i], l["token_logprobs"][i], l["top_logprobs"][i]))
    });
    (text, lp.collect())
}

/// 16 clients × 50 requests (f32; bf16: × 12), streamed and not, one in ten dropped after its first
/// event, against `--parallel 16`: every answer equals its prompt's lone answer bit for bit (the
/// log-probabilities of every token and of its top 3), f32 and bf16; nothing is lost or crossed; the
/// decode steps ran several sequences at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_get_their_lone_answers_bit_for_bit() {
    for model in [TINY, "tiny-mistral-bf16"] {
        let s = Arc::new(Server::start(model, &["--parallel", "16", "--prefill-chunk", "16", "--decode-delay-ms", "3"], None).await);
        let prompts: Arc<Vec<String>> = Arc::new((0..7).map(|i| format!("Prompt {i}: {}", "tell me more ".repeat(i * 2))).collect());
        let mut alone = Vec::new();
        for p in prompts.iter() {
            alone.push(scored(&s, p, false).await);
        }
        assert!(s.log().contains("16 sequences at once"), "{}", s.log());
        let (steps, rows) = (s.metric("expanse_decode_steps_total").await, s.metric("expanse_decode_step_tokens_total").await);
        // The f32 run is the soak (16 clients × 50 requests with disconnects).
        let per_client = if model == TINY { 50 } else { 12 };
        let clients: Vec<_> = (0..16)
            .map(|c| {
                let (s, prompts) = (s.clone(), prompts.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for r in 0..per_client {
                        let (i, stream) = ((c * 5 + r) % prompts.len(), (c + r) % 2 == 0);
                        if stream && (c + r) % 5 == 0 {
                            let body = json!({ "prompt": prompts[i], "max_tokens": 200, "stream": true, "temperature": 0 });
                            let mut events = s.post("/v1/completions", &body).await.bytes_stream().eventsource();
                            events.next().await.unwrap().unwrap();
                            continue;
                        }
                        got.push((i, scored(&s, &prompts[i], stream).await));
                    }
                    got
                })
            })
            .collect();
        let mut answered = 0;
        for c in clients {
            for (i, answer) in c.await.unwrap() {
                assert!(answer == alone[i], "{model} prompt {i}: {answer:?}\nalone: {:?}", alone[i]);
                answered += 1;
            }
        }
        // Every request not dropped on purpose was answered (one in ten is dropped: streamed and c + r ≡ 0 mod 5).
        let dropped = (0..16).flat_map(|c| (0..per_client).map(move |r| (c, r))).filter(|(c, r)| (c + r) % 2 == 0 && (c + r) % 5 == 0).count();
        assert_eq!(answered, 16 * per_client - dropped, "{model}: answers lost");
        let (steps, rows) = (s.metric("expanse_decode_steps_total").await - steps, s.metric("expanse_decode_step_tokens_total").await - rows);
        assert!(rows / steps > 2.0, "{model}: {rows} tokens in {steps} decode steps: the sequences did not run together");
        // The dropped streams end (cancelled) and free their slots: nothing stays running.
        for _ in 0..100 {
            if s.metric("expanse_running_sequences").await == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(s.metric("expanse_running_sequences").await, 0.0);
        assert_eq!(s.metric("expanse_slots").await, 16.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_mid_stream_frees_the_worker() {
    let s = Server::start(TINY, &["--decode-delay-ms", "30", "--temperature", "0"], None).await;
    let resp = s.post("/v1/chat/completions", &json!({ "messages": user("Hello"), "max_tokens": 200, "stream": true })).await;
    let mut events = resp.bytes_stream().eventsource();
    for _ in 0..4 {
        events.next().await.unwrap().unwrap();
    }
    drop(events);
    // The next request is answered, and the first generation stopped long before its 200 tokens.
    let v = s.ok("/v1/chat/completions", &json!({ "messages": user("Hi"), "max_tokens": 5 })).await;
    let second = v["usage"]["completion_tokens"].as_f64().unwrap();
    assert_eq!(s.metric("expanse_cancelled_total").await, 1.0);
    let first = s.metric("expanse_generated_tokens_total").await - second;
    assert!(first < 20.0, "the abandoned generation went on for {first} tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_only_with_the_flag() {
    let origin = "http://ui.example";
    for (args, allowed) in [(&[][..], false), (&["--cors", origin][..], true)] {
        let s = Server::start(TINY, args, None).await;
        let r = s
            .http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", s.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        let allow = r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(allow.as_deref(), allowed.then_some(origin), "{args:?}");
        let r = s.http.get(format!("{}/v1/models", s.base)).header("origin", origin).send().await.unwrap();
        assert_eq!(r.headers().contains_key("access-control-allow-origin"), allowed, "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_stop_in_flight_work_and_exit_0() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut s = Server::start(TINY, &["--decode-delay-ms", "30"], None).await;
        let resp = s.post("/v1/completions", &json!({ "prompt": "Hello", "max_tokens": 200, "stream": true })).await;
        let mut events = resp.bytes_stream().eventsource();
        events.next().await.unwrap().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(s.pid(), signal) }, 0);
        let mut last = String::new();
        while let Some(Ok(e)) = events.next().await {
            last = e.data;
        }
        assert!(last.contains("shutting_down"), "the stream ends with an error event: {last}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "still running after signal {signal}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "signal {signal}: {}", s.log());
        assert!(s.http.get(format!("{}/health", s.base)).send().await.is_err(), "no longer accepting");
    }
}

// ---------------------------------------------------------------------------------------------
// Connections that misbehave (issue #22, second round): raw TCP clients, for what an HTTP library
// will not do — send half a request, trickle it, sit idle, leave mid-answer.

/// A raw connection to the server.
fn connect(s: &Server) -> std::net::TcpStream {
    std::net::TcpStream::connect(s.addr()).unwrap()
}

/// Whether the server closes `c` within `within`: a read meets the end of the stream or a reset
/// (answers read on the way are skipped).
fn closed_within(c: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Reads from `c` until what arrived contains `needle` `times` times; what arrived.
fn read_until(c: &mut std::net::TcpStream, needle: &str, times: usize) -> String {
    use std::io::Read;
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got).matches(needle).count() < times {
        let n = c.read(&mut buf).unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}; got {}", String::from_utf8_lossy(&got)));
        assert!(n > 0, "closed while waiting for {needle:?}: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// One `/health` answered over `c`, which then stays open (HTTP/1.1 keep-alive).
fn health_over(c: &mut std::net::TcpStream) {
    use std::io::Write;
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let answer = read_until(c, "}", 1);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

fn post_request(path: &str, body: &Value) -> String {
    let body = body.to_string();
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// The server's answer to `/health`, or why there was none (a dead process shows its exit status).
async fn health(s: &mut Server, http: &reqwest::Client) -> Result<StatusCode, String> {
    match http.get(format!("{}/health", s.base)).send().await {
        Ok(r) => Ok(r.status()),
        Err(e) => {
            let mut why = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                why.push_str(&format!(": {c}"));
                cause = c.source();
            }
            Err(format!("{why}; process: {:?}; log:\n{}", s.exit_within(Duration::from_secs(2)), s.log()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_mid_answer_cannot_kill_the_server() {
    use std::io::Write;
    let mut s = Server::start(TINY, &["--temperature", "0", "--decode-delay-ms", "2"], None).await;
    let stream = post_request("/v1/chat/completions", &json!({ "messages": user("Hello"), "max_tokens": 200, "stream": true }));
    let http = reqwest::Client::new();
    let mut left = 0.0;
    // 80 answers; every fifth client leaves after two chunks while the server goes on writing to it.
    for i in 0..80 {
        if i % 5 == 4 {
            let mut c = connect(&s);
            // Every other one leaves the way that makes the server's next write raise SIGPIPE every
            // time: with the start of a next request sent along, hyper does not read the connection
            // mid-answer, so it misses the FIN; its next write meets the reset of a closed socket,
            // which in CLOSE_WAIT the kernel reports as EPIPE (and, on writev, with SIGPIPE).
            let next = if i % 10 == 9 { "GET /health HTTP/1.1\r\n" } else { "" };
            c.write_all(format!("{stream}{next}").as_bytes()).unwrap();
            read_until(&mut c, "data: ", 3);
            if !next.is_empty() {
                c.shutdown(std::net::Shutdown::Write).unwrap();
            }
            drop(c);
            // Until the server has seen the client go (the worker counts the generation cancelled).
            left += 1.0;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                // (The server writes a token every 2 ms: by now the next write after the client left is done.)
                tokio::time::sleep(Duration::from_millis(10)).await;
                let alive = health(&mut s, &http).await;
                assert_eq!(alive, Ok(StatusCode::OK), "after client {i} left mid-answer");
                if s.metric("expanse_cancelled_total").await >= left {
                    break;
                }
                assert!(Instant::now() < deadline, "client {i} left 20 s ago and its generation goes on");
            }
        } else {
            ask_on(&s, user("Hi"), i % 2 == 0).await;
        }
    }
    // What such a write raises, delivered outright: a server ignores it.
    s.signal(libc::SIGPIPE);
    assert_eq!(health(&mut s, &http).await, Ok(StatusCode::OK), "after SIGPIPE");
    assert!(s.child.try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_server_in_bounded_time_whatever_its_connections_do() {
    use std::io::Write;
    // A half-sent request head and an idle keep-alive connection: closed at once, exit 0.
    let mut s = Server::start(TINY, &[], None).await;
    let mut partial = connect(&s);
    partial.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: b").unwrap();
    let mut idle = connect(&s);
    health_over(&mut idle);
    s.signal(libc::SIGTERM);
    let status = s.exit_within(Duration::from_secs(10));
    assert_eq!(status.and_then(|st| st.code()), Some(0), "10 s after SIGTERM: {status:?}; log:\n{}", s.log());
    assert!(closed_within(&mut partial, Duration::from_secs(1)) && closed_within(&mut idle, Duration::from_secs(1)));

    // A request whose body stops halfway is in flight: --shutdown-timeout bounds the wait for it
    // (--header-timeout, which would end it too, is far longer).
    let mut s = Server::start(TINY, &["--shutdown-timeout", "1", "--header-timeout", "120"], None).await;
    let mut stalled = connect(&s);
    stalled
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    // hyper says `100 Continue` when the handler starts reading the body: the request is in flight.
    read_until(&mut stalled, "100 Continue", 1);
    stalled.write_all(b"{\"prompt\": \"He").unwrap();
    s.signal(libc::SIGTERM);
    let status = s.exit_within(Duration::from_secs(20));
    assert_eq!(status.and_then(|st| st.code()), Some(0), "20 s after SIGTERM: {status:?}; log:\n{}", s.log());
    assert!(closed_within(&mut stalled, Duration::from_secs(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_but_long_answers_are_not() {
    use std::io::Write;
    let args = ["--header-timeout", "1", "--idle-timeout", "2", "--decode-delay-ms", "100", "--temperature", "0"];
    let mut s = Server::start(TINY, &args, None).await;
    // A fresh connection per request: a pooled one could meet the idle timeout as it is reused.
    s.http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    // An answer of 40 tokens, 100 ms apart, outlives both timeouts.
    let long = {
        let (http, url) = (s.http.clone(), format!("{}/v1/chat/completions", s.base));
        tokio::spawn(async move {
            let body = json!({ "messages": user("Hello"), "max_tokens": 40, "stream": true, "stream_options": { "include_usage": true } });
            sse_events(http.post(url).json(&body).send().await.unwrap()).await
        })
    };
    // Headers trickled a byte every 100 ms, and a body that stops halfway: cut off.
    let mut trickle = connect(&s);
    trickle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    let started = Instant::now();
    while !closed_within(&mut trickle, Duration::from_millis(100)) {
        assert!(started.elapsed() < Duration::from_secs(20), "a client trickling its headers is still connected after 20 s");
        let _ = trickle.write_all(b"a");
    }
    let mut half = connect(&s);
    half.write_all(post_request("/v1/completions", &json!({ "prompt": "Hello there" })).trim_end_matches('}').as_bytes()).unwrap();
    assert!(closed_within(&mut half, Duration::from_secs(20)), "a request whose body stopped halfway is still connected after 20 s");
    // Idle connections, fresh ones and ones kept alive after an answer: closed.
    let mut idle: Vec<_> = (0..20).map(|_| connect(&s)).collect();
    for c in idle.iter_mut().step_by(2) {
        health_over(c);
    }
    for (i, c) in idle.iter_mut().enumerate() {
        assert!(closed_within(c, Duration::from_secs(20)), "idle connection {i} still open after 20 s");
    }
    let events = long.await.unwrap();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the long answer ended whole: {events:?}");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 40, "all 40 tokens, 4 s of them: {events:?}");
    assert_eq!(health(&mut s, &reqwest::Client::new()).await, Ok(StatusCode::OK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_health_still_answers() {
    // With 128 file descriptors (`ulimit -n 128`) and the default cap, 160 idle connections.
    let mut s = Server::start_with_fds(TINY, &[], 128).await;
    let mut idle: Vec<_> = (0..160).map(|_| connect(&s)).collect();
    // A fresh connection per request: a pooled one may be the idle one closed to make room.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(0).build().unwrap();
    assert_eq!(health(&mut s, &http).await, Ok(StatusCode::OK), "/health with 160 idle connections and 128 file descriptors");
    assert!(closed_within(&mut idle[0], Duration::from_secs(5)), "the longest idle connection made room");
    drop(idle);

    // --max-connections 8: a busy connection is never the one closed, idle ones are, longest idle first;
    // with every connection busy a new one is refused with a 503.
    let mut s = Server::start(TINY, &["--max-connections", "8", "--decode-delay-ms", "20", "--temperature", "0"], None).await;
    let mut busy = connect(&s);
    {
        use std::io::Write;
        busy.write_all(post_request("/v1/completions", &json!({ "prompt": "Hello", "max_tokens": 100, "stream": true })).as_bytes()).unwrap();
    }
    // Answering, before the idle ones come.
    let mut answer = read_until(&mut busy, "data: ", 1);
    let mut idle: Vec<_> = (0..20).map(|_| connect(&s)).collect();
    for _ in 0..3 {
        assert_eq!(health(&mut s, &http).await, Ok(StatusCode::OK), "/health at the cap");
    }
    assert!(s.metric("expanse_open_connections").await <= 8.0);
    for (i, c) in idle.iter_mut().enumerate().take(12) {
        assert!(closed_within(c, Duration::from_secs(5)), "idle connection {i} of 20 still open at a cap of 8");
    }
    answer.push_str(&read_until(&mut busy, "[DONE]", 1));
    assert!(answer.contains("\"finish_reason\":\"length\""), "the busy connection's answer is whole: {answer}");
    drop(idle);
    let streams: Vec<_> = (0..8)
        .map(|_| {
            use std::io::Write;
            let mut c = connect(&s);
            c.write_all(post_request("/v1/completions", &json!({ "prompt": "Hello", "max_tokens": 200, "stream": true })).as_bytes()).unwrap();
            read_until(&mut c, "HTTP/1.1 200", 1);
            c
        })
        .collect();
    let refused = http.get(format!("{}/health", s.base)).send().await;
    let refused = refused.unwrap_or_else(|e| panic!("no answer with every connection busy: {e}"));
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"), "Retry-After on a refused connection");
    assert_eq!(refused.json::<Value>().await.unwrap()["error"]["code"], "too_many_connections");
    drop(streams);
    // Once the server has seen them go (it reads their close, or meets it writing the next token).
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(&mut s, &http).await != Ok(StatusCode::OK) {
        assert!(Instant::now() < deadline, "/health still refused 20 s after the streams' clients left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_overflow_is_context_length_exceeded_and_no_error_names_a_server_file() {
    let s = Server::start(TINY, &[], None).await;
    let private = fixtures().display().to_string();
    let conversation = |n: usize| -> Value {
        (0..n).map(|i| json!({ "role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("message number {i}") })).collect()
    };
    // Too long in tokens (200 messages), and too long even to render (3,001 messages, a 40 kB prompt).
    let cases = [
        ("/v1/chat/completions", json!({ "messages": conversation(200) }), "messages"),
        ("/v1/chat/completions", json!({ "messages": conversation(3001) }), "messages"),
        ("/v1/completions", json!({ "prompt": "word ".repeat(8000) }), "prompt"),
    ];
    for (path, body, param) in cases {
        let r = s.post(path, &body).await;
        let text = r.text().await.unwrap();
        assert!(!text.contains(&private), "{path} {param}: the answer names the server's files: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((v["error"]["code"].as_str(), v["error"]["param"].as_str()), (Some("context_length_exceeded"), Some(param)), "{path}: {v}");
    }
    // A template that raises: its message reaches the client, the template's path does not.
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("strict.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('boom is not allowed') }}{% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let s = Server::start(TINY, &["--chat-template", template.to_str().unwrap()], None).await;
    let r = s.post("/v1/chat/completions", &json!({ "messages": user("boom") })).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let text = r.text().await.unwrap();
    assert!(text.contains("boom is not allowed") && !text.contains(&dir.path().display().to_string()), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Issue #26: logprobs, echo, prompt lists, n, and an assistant prefill continued.

/// The f64 log-softmax of each row of the reference path's logits (`expanse logits`: one
/// full-sequence forward from an empty cache) for `ids`: row i scores token i + 1.
fn reference_logprobs(ids: &[u32]) -> Vec<Vec<f64>> {
    let loaded = load(TINY, "every:4", "auto");
    let logits = expanse::cmd::logits::all_logits(&loaded, ids).unwrap();
    let vocab = logits.dims()[1];
    let values = expanse::compare::f32_values(&logits).unwrap();
    values
        .chunks(vocab)
        .map(|row| {
            assert!(row.iter().all(|x| x.is_finite()), "reference logits hold a non-finite value");
            let max = row.iter().map(|&x| f64::from(x)).fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|&x| (f64::from(x) - max).exp()).sum::<f64>().ln();
            row.iter().map(|&x| f64::from(x) - lse).collect()
        })
        .collect()
}

/// The reference log-probability of each of `generated` after `prompt`.
fn reference_for(prompt: &[u32], generated: &[u32]) -> Vec<f32> {
    let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    let rows = reference_logprobs(&all);
    generated.iter().enumerate().map(|(j, &id)| rows[prompt.len() - 1 + j][id as usize] as f32).collect()
}

/// Numbers of a JSON list (a null or any non-number panics: nothing stands in for a value).
fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|x| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")) as f32).collect()
}

/// Whether `got` equals `want` within f32 tolerance, through `expanse::compare` (NaN never passes).
fn close(got: &[f32], want: &[f32]) -> bool {
    expanse::compare::Diff::new(got, want).within(1e-4)
}

fn tiny_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join(TINY).join("tokenizer.json")).unwrap()
}

/// A token's text as the wire shows it (SentencePiece's `▁` is a space).
fn wire_token(tok: &Tokenizer, id: u32) -> String {
    tok.id_to_token(id).unwrap().replace('\u{2581}', " ")
}

/// The chunks of a streamed answer (the JSON events before `[DONE]`, which must end it).
pub(super) async fn stream_chunks(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let events = sse_events(s.post(path, &body).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    events[..events.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// Through the server, each greedy token's logprob is the log-softmax of the reference logits at its
/// position; the alternatives come most likely first, the greedy token at their head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_the_reference_log_softmax_of_each_token() {
    let s = Server::start(TINY, &[], None).await;
    let tok = tiny_tokenizer();
    // Completions: the legacy shape.
    let (_, generated, _) = generate("Hello there", &["--temperature", "0", "--max-tokens", "6", "--raw"]);
    let prompt = tok.encode("Hello there", true).unwrap();
    let want = reference_for(&prompt, &generated);
    let body = json!({ "prompt": "Hello there", "max_tokens": 6, "temperature": 0, "logprobs": 5 });
    let v = s.ok("/v1/completions", &body).await;
    let lp = &v["choices"][0]["logprobs"];
    let got = floats(&lp["token_logprobs"]);
    assert!(close(&got, &want), "served {got:?}, reference {want:?}");
    let tokens: Vec<String> = generated.iter().map(|&id| wire_token(&tok, id)).collect();
    assert_eq!(lp["tokens"], json!(tokens));
    let mut offset = 0;
    for (j, t) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][j], offset, "{lp}");
        offset += t.chars().count();
        let top = lp["top_logprobs"][j].as_object().unwrap();
        assert!((5..=6).contains(&top.len()), "{top:?}");
        let best = top.values().map(|x| x.as_f64().unwrap() as f32).fold(f32::NEG_INFINITY, f32::max);
        assert_eq!((top[t].as_f64().unwrap() as f32, best), (got[j], got[j]), "the greedy token is the most likely: {top:?}");
    }
    let chunks = stream_chunks(&s, "/v1/completions", &body).await;
    // Every token's chunk carries its logprobs; the finish chunk none.
    let scored: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["logprobs"].is_null()).collect();
    assert_eq!(scored.len(), generated.len());
    assert!(chunks.iter().all(|c| c["choices"][0]["finish_reason"].is_null() || c["choices"][0]["logprobs"].is_null()));
    let streamed: Vec<f32> = scored.iter().flat_map(|c| floats(&c["choices"][0]["logprobs"]["token_logprobs"])).collect();
    assert!(close(&streamed, &got), "streamed {streamed:?}, whole {got:?}");
    // The raw model's values: a token forced by logit_bias and picked at temperature 2 keeps its own
    // (unlikely) log-probability, not the sampler's.
    let forced = tok.token_id("\u{2581}house").unwrap();
    let body = json!({ "prompt": "Hello there", "max_tokens": 1, "temperature": 2, "logprobs": 0, "logit_bias": { forced.to_string(): 100 } });
    let v = s.ok("/v1/completions", &body).await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!([" house"]));
    let raw = reference_for(&prompt, &[forced]);
    assert!(close(&floats(&lp["token_logprobs"]), &raw) && raw[0] < -1.0, "{lp} vs {raw:?}");

    // Chat: `content` entries with their top_logprobs lists.
    let (_, generated, _) = generate("Hello", &["--temperature", "0", "--max-tokens", "6"]);
    let source = expanse::engine::Source::open(&fixture(TINY), None).unwrap();
    let prompter = expanse::conversation::Prompter::for_source(&source, None, &[]).unwrap();
    let prompt = prompter.encode(&[expanse::template::Message::user("Hello")]).unwrap().1;
    let want = reference_for(&prompt, &generated);
    let body = json!({ "messages": user("Hello"), "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3 });
    let v = s.ok("/v1/chat/completions", &body).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    let got: Vec<f32> = content.iter().map(|e| e["logprob"].as_f64().unwrap() as f32).collect();
    assert!(close(&got, &want), "served {got:?}, reference {want:?}");
    for (e, &id) in content.iter().zip(&generated) {
        assert_eq!(e["token"], wire_token(&tok, id));
        assert_eq!(e["bytes"], json!(wire_token(&tok, id).into_bytes()));
        let top = floats(&Value::Array(e["top_logprobs"].as_array().unwrap().iter().map(|t| t["logprob"].clone()).collect()));
        assert_eq!(top.len(), 3);
        assert!(top.windows(2).all(|w| w[0] >= w[1]), "most likely first: {top:?}");
        assert_eq!((&e["top_logprobs"][0]["token"], top[0]), (&e["token"], e["logprob"].as_f64().unwrap() as f32), "the greedy token heads them");
    }
    let chunks = stream_chunks(&s, "/v1/chat/completions", &body).await;
    let streamed: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned()).flatten().collect();
    assert_eq!(streamed, content, "streamed entries equal the whole answer's");
    // Out of range: a 400 naming the field.
    for (path, body, field) in [
        ("/v1/completions", json!({ "prompt": "Hi", "logprobs": 21 }), "logprobs"),
        ("/v1/completions", json!({ "prompt": "Hi", "logprobs": -1 }), "logprobs"),
        ("/v1/chat/completions", json!({ "messages": user("Hi"), "logprobs": true, "top_logprobs": 21 }), "top_logprobs"),
    ] {
        assert_error(s.post(path, &body).await, 400, None, Some(field), field).await;
    }
}

/// `echo` writes the prompt before the answer, with its tokens' logprobs (the first null) when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_writes_the_prompt_and_its_logprobs() {
    let s = Server::start(TINY, &[], None).await;
    let tok = tiny_tokenizer();
    let plain = s.ok("/v1/completions", &json!({ "prompt": "Hello there", "max_tokens": 4, "temperature": 0 })).await;
    let answer = plain["choices"][0]["text"].as_str().unwrap();
    let body = json!({ "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "echo": true });
    let v = s.ok("/v1/completions", &body).await;
    assert_eq!(v["choices"][0]["text"], format!("Hello there{answer}"));
    assert!(v["choices"][0]["logprobs"].is_null());

    let mut scored = body.clone();
    scored["logprobs"] = json!(1);
    let v = s.ok("/v1/completions", &scored).await;
    let lp = &v["choices"][0]["logprobs"];
    let prompt = tok.encode("Hello there", true).unwrap();
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len() + n, "{lp}");
    assert_eq!((&lp["tokens"][0], &lp["token_logprobs"][0], &lp["top_logprobs"][0]), (&json!("<s>"), &Value::Null, &Value::Null));
    let list = lp["token_logprobs"].as_array().unwrap();
    let got = floats(&Value::Array(list[1..prompt.len()].to_vec()));
    assert!(close(&got, &reference_for(&prompt[..1], &prompt[1..])), "prompt logprobs {got:?}");
    let chunks = stream_chunks(&s, "/v1/completions", &scored).await;
    assert_eq!(chunks[0]["choices"][0]["text"], "Hello there", "the echo opens the stream");
    assert_eq!(chunks[0]["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), prompt.len());
    let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());
}

/// A list of prompts is one choice per prompt, in order, each as if asked alone; `n` choices of one
/// prompt are equal when greedy and use seeds seed, seed + 1, … when sampling; usage sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_lists_and_n_choices() {
    let s = Server::start(TINY, &["--prefill-chunk", "4"], None).await;
    let alone = |prompt: Value, extra: Value| {
        let mut body = json!({ "prompt": prompt, "max_tokens": 5, "temperature": 0 });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let a = s.ok("/v1/completions", &alone(json!("Hello there"), json!({}))).await;
    let b = s.ok("/v1/completions", &alone(json!("Hi"), json!({}))).await;
    let texts = [&a["choices"][0]["text"], &b["choices"][0]["text"]];
    let ids_a = s.ok("/tokenize", &json!({ "content": "Hello there", "add_special": true })).await["tokens"].clone();
    let ids_b = s.ok("/tokenize", &json!({ "content": "Hi", "add_special": true })).await["tokens"].clone();
    let sum = |k: &str| a["usage"][k].as_u64().unwrap() + b["usage"][k].as_u64().unwrap();
    for prompts in [json!(["Hello there", "Hi"]), json!([ids_a, ids_b])] {
        let v = s.ok("/v1/completions", &alone(prompts.clone(), json!({}))).await;
        for i in 0..2 {
            assert_eq!((&v["choices"][i]["index"], &v["choices"][i]["text"]), (&json!(i), texts[i]), "{prompts}: {v}");
        }
        assert_eq!(
            (v["usage"]["prompt_tokens"].as_u64(), v["usage"]["completion_tokens"].as_u64()),
            (Some(sum("prompt_tokens")), Some(sum("completion_tokens")))
        );
        let chunks = stream_chunks(&s, "/v1/completions", &alone(prompts, json!({ "stream_options": { "include_usage": true } }))).await;
        let indices: Vec<u64> = chunks.iter().filter_map(|c| c["choices"][0]["index"].as_u64()).collect();
        assert!(indices.windows(2).all(|w| w[0] <= w[1]) && indices.contains(&1), "choices in order: {indices:?}");
        for i in 0..2u64 {
            let text: String = chunks.iter().filter(|c| c["choices"][0]["index"] == i).map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
            assert_eq!(&json!(text), texts[i as usize]);
        }
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"].as_u64(), Some(sum("completion_tokens")));
    }
    // n = 3, greedy: three equal choices; the prompt counts once; choices after the first reuse its cache.
    let prompt = "Tell me about the weather in Paris today";
    let one = s.ok("/v1/completions", &alone(json!(prompt), json!({}))).await;
    let before = s.metric("expanse_cached_prompt_tokens_total").await;
    let three = s.ok("/v1/completions", &alone(json!(prompt), json!({ "n": 3 }))).await;
    let reused = s.metric("expanse_cached_prompt_tokens_total").await - before;
    let prompt_tokens = one["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(reused >= 2.0 * (prompt_tokens - 5.0).max(4.0), "the 2nd and 3rd choices reuse the prompt's cache: {reused} of {prompt_tokens}");
    for i in 0..3 {
        assert_eq!((&three["choices"][i]["index"], &three["choices"][i]["text"]), (&json!(i), &one["choices"][0]["text"]));
    }
    assert_eq!(three["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    assert_eq!(three["usage"]["completion_tokens"].as_u64(), one["usage"]["completion_tokens"].as_u64().map(|c| 3 * c));
    // Sampling: choice i is what seed + i gives alone.
    let sampled = json!({ "temperature": 0.9, "max_tokens": 12 });
    let with_seed = |seed: u64| {
        let mut b = alone(json!(prompt), sampled.clone());
        b["seed"] = json!(seed);
        b
    };
    let mut two = with_seed(7);
    two["n"] = json!(2);
    let chat = s.ok("/v1/chat/completions", &json!({ "messages": user(prompt), "n": 2, "temperature": 0.9, "seed": 7, "max_tokens": 12 })).await;
    let v = s.ok("/v1/completions", &two).await;
    for i in 0..2u64 {
        let single = s.ok("/v1/completions", &with_seed(7 + i)).await;
        assert_eq!(v["choices"][i as usize]["text"], single["choices"][0]["text"], "choice {i} samples with seed 7 + {i}");
        let single = s.ok("/v1/chat/completions", &json!({ "messages": user(prompt), "temperature": 0.9, "seed": 7 + i, "max_tokens": 12 })).await;
        assert_eq!(chat["choices"][i as usize]["message"], single["choices"][0]["message"], "chat choice {i}");
    }
    assert_ne!(v["choices"][0]["text"], v["choices"][1]["text"], "two seeds, two samples");
    // Streamed chat: each choice opens with its role.
    let chunks = stream_chunks(&s, "/v1/chat/completions", &json!({ "messages": user(prompt), "n": 2, "max_tokens": 3, "temperature": 0 })).await;
    let roles: Vec<&Value> = chunks.iter().filter(|c| c["choices"][0]["delta"]["role"] == "assistant").map(|c| &c["choices"][0]["index"]).collect();
    assert_eq!(roles, [&json!(0), &json!(1)]);
    for (body, field) in [(json!({ "prompt": "Hi", "n": 9 }), "n"), (json!({ "prompt": "Hi", "n": 0 }), "n"), (json!({ "prompt": vec!["Hi"; 9] }), "prompt")] {
        assert_error(s.post("/v1/completions", &body).await, 400, None, Some(field), field).await;
    }
}

/// A final assistant message is continued: the prompt ends with its text (no end of turn, no new
/// turn) and the answer carries on from it, as the same ids sent as a completions prompt do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_prefill_is_continued() {
    use expanse::template::{Ending, Message};
    let s = Server::start(TINY, &[], None).await;
    let source = expanse::engine::Source::open(&fixture(TINY), None).unwrap();
    let prompter = expanse::conversation::Prompter::for_source(&source, None, &[]).unwrap();
    let msgs = [Message::user("What is 2+2?"), Message::assistant("The answer is")];
    let continued = prompter.encode_ending(&msgs, Ending::Continue).unwrap().1;
    let tail = prompter.tokenizer.encode("The answer is", false).unwrap();
    assert!(continued.ends_with(&tail), "{continued:?} ends with {tail:?}");
    let messages = json!([{ "role": "user", "content": "What is 2+2?" }, { "role": "assistant", "content": "The answer is" }]);
    let body = json!({ "messages": messages, "max_tokens": 6, "temperature": 0 });
    let v = s.ok("/v1/chat/completions", &body).await;
    assert_eq!(v["usage"]["prompt_tokens"], continued.len());
    let by_ids = s.ok("/v1/completions", &json!({ "prompt": continued, "max_tokens": 6, "temperature": 0 })).await;
    let answer = &v["choices"][0]["message"]["content"];
    assert_eq!(answer, &by_ids["choices"][0]["text"], "the answer continues the prefill");
    let mut explicit = body.clone();
    explicit["continue_final_message"] = json!(true);
    explicit["add_generation_prompt"] = json!(false);
    assert_eq!(&s.ok("/v1/chat/completions", &explicit).await["choices"][0]["message"]["content"], answer, "vLLM's fields, same prompt");
    let chunks = stream_chunks(&s, "/v1/chat/completions", &body).await;
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("")).collect();
    assert_eq!(&json!(streamed), answer);
    // Asked not to continue: a new assistant turn after the message.
    let mut new_turn = body.clone();
    new_turn["continue_final_message"] = json!(false);
    let opened = prompter.encode_ending(&msgs, Ending::Open).unwrap().1;
    assert_eq!(s.ok("/v1/chat/completions", &new_turn).await["usage"]["prompt_tokens"], opened.len());
    let mut both = body.clone();
    both["continue_final_message"] = json!(true);
    both["add_generation_prompt"] = json!(true);
    assert_error(s.post("/v1/chat/completions", &both).await, 400, None, Some("add_generation_prompt"), "both").await;
    let lone = json!({ "messages": user("Hi"), "continue_final_message": true });
    assert_error(s.post("/v1/chat/completions", &lone).await, 400, None, Some("continue_final_message"), "no assistant message").await;
}
