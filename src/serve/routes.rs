//! The HTTP side: the axum router, its handlers, and the middleware around them (request counting,
//! auth, body limit, CORS). Handlers check and tokenize a request, queue a `Job`, and turn the job's
//! events into a JSON answer or an SSE stream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request as HttpRequest, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::auth::ApiKey;
use super::error::ApiError;
use super::openai::{finish_reason, Endpoint, Envelope, Input, Request, Usage};
use super::worker::{Event, Job, Outcome, Queue, Shared, SubmitError};
use crate::conversation::Prompter;
use crate::error::Error;
use crate::generation::StopReason;
use crate::sampling::SamplingParams;
use crate::template::Message;

/// What every handler reads: the queue to the worker, the prompters, and the server's settings.
pub struct App {
    pub shared: Arc<Shared>,
    pub queue: Queue,
    /// The names a request may give as `model`: the aliases, then the checkpoint's (answers carry
    /// the name the request gave, else the first).
    pub names: Vec<String>,
    pub created: u64,
    /// The chat template's prompter (chat completions) and the raw one (completions).
    pub chat: Arc<Prompter>,
    pub raw: Arc<Prompter>,
    pub limits: Limits,
    /// Sampling for the fields a request leaves out: generation_config.json under the flags.
    pub defaults: SamplingParams,
    /// `--system`, for conversations that bring none.
    pub system: Option<String>,
    pub api_key: Option<ApiKey>,
}

/// What bounds a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// KV cache length: prompt and answer together.
    pub context: usize,
    /// Answer length when a request names none (`--max-tokens`, else the cap).
    pub max_tokens: usize,
    /// Most tokens a request may ask for (`--max-tokens-cap`).
    pub max_tokens_cap: usize,
    /// Largest request body (`--body-limit`).
    pub body: usize,
}

pub fn router(app: Arc<App>, cors: Option<tower_http::cors::CorsLayer>) -> Router {
    let r = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|method: Method, uri: Uri| async move { ApiError::route_not_found(method.as_str(), uri.path()) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move { ApiError::method_not_allowed(method.as_str(), uri.path()) })
        .layer(DefaultBodyLimit::max(app.limits.body))
        // A bug in a handler answers 500 instead of dropping the connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| ApiError::internal("the request handler panicked").into_response()))
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app);
    match cors {
        Some(c) => r.layer(c),
        None => r,
    }
}

/// Counts every answer by status for `/metrics`.
async fn count(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    let resp = next.run(req).await;
    app.shared.metrics.count_request(resp.status().as_u16());
    resp
}

/// With `--api-key`, everything but `/health` needs the key.
async fn auth(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    match &app.api_key {
        Some(key) if req.uri().path() != "/health" && !key.allows(req.headers()) => ApiError::unauthorized().into_response(),
        _ => next.run(req).await,
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.shared.ready.load(Ordering::SeqCst) {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        ApiError::unavailable("model_loading", "the model is loading").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], app.shared.metrics.render()).into_response()
}

/// `--alias` names first (in order, each once), then the checkpoint's own name.
pub fn served_names(aliases: &[String], checkpoint: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in aliases.iter().map(String::as_str).chain([checkpoint]) {
        if !names.iter().any(|m| m == n) {
            names.push(n.to_string());
        }
    }
    names
}

fn model_object(app: &App, name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": app.created, "owned_by": "expanse" })
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app.names.iter().map(|n| model_object(&app, n)).collect();
    Json(json!({ "object": "list", "data": data }))
}

impl App {
    /// The served name `requested` is, or a 404 listing them.
    fn served(&self, requested: &str) -> Result<&str, ApiError> {
        self.names.iter().find(|n| *n == requested).map(String::as_str).ok_or_else(|| ApiError::model_not_found(requested, &self.names.join("`, `")))
    }
}

async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let name = app.served(&id)?;
    Ok(Json(model_object(&app, name)))
}

/// The body of a non-generating endpoint as JSON, or a 400.
fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(limit),
        _ => ApiError::bad_request(format!("could not read the body: {}", r.body_text())),
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// llama-server's `POST /tokenize`: `{"content", "add_special" (false), "with_pieces" (false)}` →
/// `{"tokens": [id, ...]}`, or `[{"id", "piece"}, ...]` with pieces. Special tokens written in the
/// text are parsed as such, as llama-server does.
async fn tokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let v = json_body(body, app.limits.body)?;
    let content = v.get("content").and_then(Value::as_str).ok_or_else(|| ApiError::field("content", "`content` must be a string"))?;
    let flag = |k: &str| match v.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::field(k, format!("`{k}` must be true or false"))),
    };
    let (add_special, with_pieces) = (flag("add_special")?, flag("with_pieces")?);
    let tok = &app.raw.tokenizer;
    let ids = tok.encode(content, add_special).map_err(|e| ApiError::field("content", e.to_string()))?;
    if !with_pieces {
        return Ok(Json(json!({ "tokens": ids })));
    }
    let pieces = ids
        .iter()
        .map(|&id| Ok(json!({ "id": id, "piece": tok.decode(&[id], false).map_err(|e| ApiError::internal(e.to_string()))? })))
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(Json(json!({ "tokens": pieces })))
}

/// llama-server's `POST /detokenize`: `{"tokens": [id, ...]}` → `{"content"}`; an id outside the
/// vocabulary is a 400 naming `tokens`.
async fn detokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let v = json_body(body, app.limits.body)?;
    let bad = || ApiError::field("tokens", "`tokens` must be a list of token ids");
    let list = v.get("tokens").and_then(Value::as_array).ok_or_else(bad)?;
    let tok = &app.raw.tokenizer;
    let vocab = tok.inner().get_vocab_size(true) as u64;
    let ids = list
        .iter()
        .map(|x| match x.as_u64() {
            Some(id) if id < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::field("tokens", format!("token id {id} is outside the vocabulary (0 to {})", vocab - 1))),
            None => Err(bad()),
        })
        .collect::<Result<Vec<u32>, ApiError>>()?;
    let content = tok.decode(&ids, false).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({ "content": content })))
}

async fn chat_completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(&app, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(&app, Endpoint::Completion, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Checks, tokenizes and queues a request, then answers it whole or as a stream.
async fn answer(app: &App, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(app.limits.body),
        _ => ApiError::bad_request(format!("could not read the body: {}", r.body_text())),
    })?;
    let req = Request::parse(endpoint, &body, &app.defaults)?;
    let name = match req.model.as_deref() {
        Some(m) => app.served(m)?.to_string(),
        None => app.names[0].clone(),
    };
    if !app.shared.ready.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("model_loading", "the model is still loading (GET /health answers 200 once it is ready)"));
    }
    // A bias on a token the tokenizer does not have is a mistake in the request, not a no-op.
    let vocab = app.raw.tokenizer.inner().get_vocab_size(true);
    if let Some((id, _)) = req.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
        return Err(ApiError::field("logit_bias", format!("logit_bias: token id {id} is outside the vocabulary (0 to {})", vocab - 1)));
    }
    let (job, rx) = app.job(&req)?;
    app.queue.submit(job).map_err(|e| match e {
        SubmitError::Full => ApiError::unavailable("queue_full", "every place in the queue is taken (--queue); try again shortly"),
        SubmitError::Stopped => stopping(),
    })?;
    let envelope = Envelope { endpoint, id: answer_id(endpoint), created: unix_time(), model: name };
    if req.stream {
        let events = sse(envelope, rx, req.include_usage).map(Ok::<_, Infallible>);
        Ok(Sse::new(events).into_response())
    } else {
        Ok(Json(collect(envelope, rx).await?).into_response())
    }
}

fn stopping() -> ApiError {
    ApiError::unavailable("shutting_down", "the server is shutting down")
}

impl App {
    /// A token-id prompt's ids, each within the tokenizer's vocabulary.
    fn check_ids(&self, ids: &[u32]) -> Result<Vec<u32>, ApiError> {
        let vocab = self.raw.tokenizer.inner().get_vocab_size(true);
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(ApiError::field("prompt", format!("prompt: token id {id} is outside the vocabulary (0 to {})", vocab - 1))),
            None => Ok(ids.to_vec()),
        }
    }

    /// The request's prompt ids, answer length and stops, checked against the context.
    fn job(&self, req: &Request) -> Result<(Job, UnboundedReceiver<Event>), ApiError> {
        let (prompter, input_param, rendered) = match &req.input {
            Input::Messages(messages) => {
                let mut messages = messages.clone();
                if let Some(s) = self.system.as_deref().filter(|_| messages[0].role != "system") {
                    messages.insert(0, Message::system(s));
                }
                (&self.chat, "messages", self.chat.encode(&messages))
            }
            Input::Prompt(p) => (&self.raw, "prompt", self.raw.encode(&[Message::user(p.as_str())])),
            Input::Ids(ids) => (&self.raw, "prompt", Ok((String::new(), self.check_ids(ids)?))),
        };
        let ctx = self.limits.context;
        // A client hears what is wrong with its request, never where the server keeps its files.
        let (_, prompt) = rendered.map_err(|e| match e {
            Error::PromptTooLong { .. } => {
                ApiError::context_length(input_param, format!("the prompt is longer than the server's context of {ctx} tokens can hold"))
            }
            e => ApiError::field(input_param, e.without_paths()),
        })?;
        if prompt.len() > ctx {
            let msg = format!("the prompt is {} tokens; the server's context is {ctx} tokens", prompt.len());
            return Err(ApiError::context_length(input_param, msg));
        }
        let max_tokens = match req.max_tokens {
            Some(n) if n > self.limits.max_tokens_cap => {
                return Err(ApiError::field(
                    "max_tokens",
                    format!("max_tokens {n} is over the server's cap of {} (--max-tokens-cap)", self.limits.max_tokens_cap),
                ));
            }
            Some(n) if prompt.len() + n > ctx => {
                let msg = format!("the prompt ({} tokens) and max_tokens ({n}) exceed the server's context of {ctx} tokens", prompt.len());
                return Err(ApiError::context_length("max_tokens", msg));
            }
            Some(n) => n,
            None => self.limits.max_tokens,
        };
        let (stop_ids, stop_strings) = prompter.with_stops(&req.stop);
        let (tx, rx) = unbounded_channel();
        Ok((Job { prompt, sampling: req.sampling.clone(), max_tokens, stop_ids, stop_strings, events: tx }, rx))
    }
}

/// The whole answer, once the worker is done.
async fn collect(envelope: Envelope, mut rx: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token(piece) => text.push_str(&piece),
            Event::Done(o) if o.stop == StopReason::Interrupted => return Err(stopping()),
            Event::Done(o) => {
                text.push_str(&o.tail);
                return Ok(envelope.response(&text, finish_reason(o.stop), usage(&o)));
            }
            Event::Failed(msg) => return Err(ApiError::internal(msg)),
        }
    }
    Err(stopping())
}

fn usage(o: &Outcome) -> Usage {
    Usage::new(o.prompt_tokens, o.cached_tokens, o.completion_tokens)
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The SSE stream of one answer: a chunk per token (a chat answer opens with the assistant's role),
/// a closing chunk with `finish_reason`, the usage chunk if asked for, then `data: [DONE]`. A failure
/// after the headers went out arrives as an `{"error": …}` event, without `[DONE]`.
fn sse(envelope: Envelope, rx: UnboundedReceiver<Event>, include_usage: bool) -> impl Stream<Item = SseEvent> {
    let opening = (envelope.endpoint == Endpoint::Chat).then(|| data(&envelope.chunk(true, None, None, include_usage)));
    let body = stream::unfold(Some(rx), move |rx| {
        let envelope = envelope.clone();
        async move {
            let mut rx = rx?;
            let events = match rx.recv().await {
                Some(Event::Token(piece)) => return Some((vec![data(&envelope.chunk(false, Some(&piece), None, include_usage))], Some(rx))),
                Some(Event::Done(o)) if o.stop == StopReason::Interrupted => vec![data(&stopping().body())],
                Some(Event::Done(o)) => {
                    let mut v = Vec::new();
                    if !o.tail.is_empty() {
                        v.push(data(&envelope.chunk(false, Some(&o.tail), None, include_usage)));
                    }
                    v.push(data(&envelope.chunk(false, None, Some(finish_reason(o.stop)), include_usage)));
                    if include_usage {
                        v.push(data(&envelope.usage_chunk(usage(&o))));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    v
                }
                Some(Event::Failed(msg)) => vec![data(&ApiError::internal(msg).body())],
                None => vec![data(&stopping().body())],
            };
            Some((events, None))
        }
    });
    stream::iter(opening).chain(body.flat_map(stream::iter))
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `chatcmpl-…` / `cmpl-…`: unique within the process and across restarts.
fn answer_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{nanos:x}{:04x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::metrics::Metrics;
    use std::sync::atomic::AtomicBool;

    /// An app over the tiny fixture's tokenizer, with the receiving end of its queue.
    fn app() -> (Arc<App>, std::sync::mpsc::Receiver<Job>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-mistral-f32");
        let source = crate::engine::Source::open(&dir.display().to_string(), None).unwrap();
        let prompter = |t| Arc::new(Prompter::for_source(&source, t, &[]).unwrap());
        let shared = Arc::new(Shared { metrics: Metrics::new(), ready: AtomicBool::new(false), stopping: AtomicBool::new(false) });
        let (queue, jobs) = Queue::new(4, shared.clone());
        let limits = Limits { context: 256, max_tokens: 16, max_tokens_cap: 64, body: 1 << 20 };
        let app = App {
            shared,
            queue,
            names: served_names(&["fast".into(), "tiny".into()], "tiny"),
            created: 0,
            chat: prompter(None),
            raw: prompter(Some("none")),
            limits,
            defaults: SamplingParams::default(),
            system: Some("Be brief.".into()),
            api_key: None,
        };
        (Arc::new(app), jobs)
    }

    async fn body(r: Response) -> Value {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn chat(text: &str) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from(json!({ "messages": [{ "role": "user", "content": text }] }).to_string()))
    }

    fn json_req(v: Value) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from(v.to_string()))
    }

    #[tokio::test]
    async fn aliases_are_served_listed_and_echoed() {
        assert_eq!(served_names(&["a".into(), "b".into(), "a".into(), "ckpt".into()], "ckpt"), ["a", "b", "ckpt"], "each name once, aliases first");
        let (app, jobs) = app();
        let listed: Vec<String> =
            models(State(app.clone())).await.0["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(listed, ["fast", "tiny"]);
        assert_eq!(model(State(app.clone()), Path("fast".into())).await.unwrap().0["id"], "fast");
        let e = model(State(app.clone()), Path("gpt-4".into())).await.unwrap_err();
        assert!(e.status == StatusCode::NOT_FOUND && e.message.contains("`fast`, `tiny`"), "{e:?}");
        app.shared.ready.store(true, Ordering::SeqCst);
        // A request naming an alias is queued (its answer would carry that name); an unknown name is not.
        let app2 = app.clone();
        let handle = tokio::spawn(async move {
            let req = json_req(json!({ "model": "fast", "messages": [{ "role": "user", "content": "Hi" }] }));
            answer(&app2, Endpoint::Chat, req).await.map(|_| ())
        });
        let job = tokio::task::spawn_blocking(move || jobs.recv_timeout(std::time::Duration::from_secs(5)).map(|_| ())).await.unwrap();
        assert!(job.is_ok(), "the alias's request reached the queue");
        handle.abort();
        let e = answer(&app, Endpoint::Chat, json_req(json!({ "model": "nope", "messages": [{ "role": "user", "content": "Hi" }] }))).await.unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, Some("model_not_found")));
    }

    /// `/tokenize` gives the tokenizer's ids (and pieces), `/detokenize` their text back; both refuse
    /// what is not theirs, naming the field.
    #[tokio::test]
    async fn tokenize_and_detokenize_as_llama_server() {
        let (app, _jobs) = app();
        let tok = |v: Value| tokenize(State(app.clone()), json_req(v));
        let ids = tok(json!({ "content": "Hello world" })).await.unwrap().0;
        let want = app.raw.tokenizer.encode("Hello world", false).unwrap();
        assert_eq!(ids["tokens"], json!(want), "no BOS unless add_special");
        let with = tok(json!({ "content": "Hello world", "add_special": true, "with_pieces": true })).await.unwrap().0;
        let pieces = with["tokens"].as_array().unwrap();
        assert_eq!(pieces[0]["id"], 1, "add_special adds the tokenizer's BOS");
        assert_eq!(pieces.len(), want.len() + 1);
        assert_eq!(pieces[1]["id"], want[0]);
        assert!(pieces[1]["piece"].as_str().is_some_and(|p| p.contains("Hello")), "{with}");
        let back = detokenize(State(app.clone()), json_req(json!({ "tokens": want }))).await.unwrap().0;
        assert_eq!(back["content"], "Hello world");
        for (body, field) in [(json!({ "content": 5 }), "content"), (json!({ "content": "x", "add_special": "yes" }), "add_special")] {
            let e = tok(body).await.unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(field)));
        }
        for body in [json!({ "tokens": [1, 99999999] }), json!({ "tokens": [-1] }), json!({ "tokens": "1,2" })] {
            let e = detokenize(State(app.clone()), json_req(body)).await.unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("tokens")), "{e:?}");
        }
    }

    #[tokio::test]
    async fn health_and_answers_wait_for_the_model() {
        let (app, _jobs) = app();
        let r = health(State(app.clone())).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r).await["error"]["code"], "model_loading");
        let e = answer(&app, Endpoint::Chat, chat("Hi")).await.unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::SERVICE_UNAVAILABLE, Some("model_loading")));
        app.shared.ready.store(true, Ordering::SeqCst);
        assert_eq!(health(State(app)).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn jobs_carry_the_rendered_prompt_and_a_worker_failure_is_a_500() {
        let (app, jobs) = app();
        app.shared.ready.store(true, Ordering::SeqCst);
        // A stand-in worker: checks each job, then fails it as an internal error would.
        let want = app.chat.encode(&[Message::system("Be brief."), Message::user("Hi")]).unwrap().1;
        let worker = std::thread::spawn(move || {
            for _ in 0..2 {
                let job = jobs.recv().unwrap();
                assert_eq!(job.prompt, want, "--system is added to a conversation without one");
                assert_eq!(job.max_tokens, 16, "the server's default answer length");
                job.events.send(Event::Token("a".into())).unwrap();
                job.events.send(Event::Failed("device lost".into())).unwrap();
            }
        });
        let e = answer(&app, Endpoint::Chat, chat("Hi")).await.unwrap_err();
        assert_eq!((e.status, e.code, e.message.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal_error"), "device lost"));
        // Streamed, the failure comes after the headers: an error event, and no [DONE].
        let streamed = Bytes::from(json!({ "messages": [{ "role": "user", "content": "Hi" }], "stream": true }).to_string());
        let r = answer(&app, Endpoint::Chat, Ok(streamed)).await.unwrap();
        let text = String::from_utf8(axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{text}");
        assert!(events[2].starts_with("data: {\"error\"") && events[2].contains("device lost"), "{text}");
        assert!(!text.contains("[DONE]"));
        worker.join().unwrap();
    }
}
